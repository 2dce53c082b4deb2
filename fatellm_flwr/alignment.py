"""Token alignment between two tokenizers, for FedMKT's logit exchange.

FedMKT (Fan et al. 2024, arXiv 2406.02224), after FuseLLM (Wan et al. 2024, arXiv
2401.10491), transfers top-k next-token distributions between models whose tokenizers
differ. Two alignments make one model's distribution usable by the other:

- **vocabulary mapping** (:class:`VocabMap`): each source token id maps to the target token
  whose text is nearest by edit distance (exact text match first; rapidfuzz's Levenshtein
  otherwise). Built lazily (only ids that occur in exchanged top-k lists are looked up) and
  cached per tokenizer pair and direction (:func:`vocab_map`);
- **sequence alignment** (:func:`dtw_path`, :func:`align_positions`): the two tokenizations
  of the same text are aligned by dynamic time warping over token strings (cost = edit
  distance); each target position takes the best-matching source position on the path, and
  a position whose match is empty or too dissimilar is excluded (never a made-up value).

Token texts are normalised first (:func:`token_texts`): byte-level BPE symbols (GPT-2's
``Ġ``/``Ċ`` byte alphabet) are decoded to text and sentencepiece's ``▁`` and ``<0xNN>`` byte
tokens become spaces/characters, so ``Ġthe`` (SmolLM2) and ``▁the`` (Gemma) both read
`` the``. Pure python/numpy (no Flower import).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
UNMAPPED = -1  # a source id with no target token (out of range, or an empty text)


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode -> byte table (inverse of ``bytes_to_unicode``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def is_byte_level(tokenizer) -> bool:
    """Whether ``tokenizer`` is a byte-level BPE (GPT-2 family: tokens spell bytes)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [getattr(backend, "pre_tokenizer", None), getattr(backend, "decoder", None)]
    return any("ByteLevel" in repr(p) for p in parts if p is not None)


def normalize_token(token: str | None, byte_level: bool) -> str:
    """The text a token stands for (``""`` for none), comparable across tokenizers."""
    if not token:
        return ""
    if byte_level:
        table = _byte_decoder()
        if all(ch in table for ch in token):
            return bytes(table[ch] for ch in token).decode("utf-8", errors="replace")
        return token  # added/special tokens are stored as plain text
    m = _BYTE_TOKEN.match(token)
    if m:  # sentencepiece byte fallback
        b = int(m.group(1), 16)
        return chr(b) if b < 128 else "\ufffd"
    return token.replace("\u2581", " ")


def tokenizer_key(tokenizer) -> tuple:
    """Identifies a tokenizer for the caches (name/path, class, size)."""
    return (getattr(tokenizer, "name_or_path", ""), type(tokenizer).__name__, len(tokenizer))


_TEXTS: dict[tuple, list[str]] = {}


def token_texts(tokenizer) -> list[str]:
    """Normalised text of every token id ``0..len(tokenizer)-1`` (cached per tokenizer)."""
    key = tokenizer_key(tokenizer)
    if key not in _TEXTS:
        byte_level = is_byte_level(tokenizer)
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        _TEXTS[key] = [normalize_token(t, byte_level) for t in tokens]
    return _TEXTS[key]


def sequence_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Normalised token texts of one tokenized sequence (unknown ids read ``""``)."""
    texts = token_texts(tokenizer)
    return [texts[i] if 0 <= i < len(texts) else "" for i in ids]


class VocabMap:
    """Source token id -> nearest target token id by minimum edit distance of their texts.

    Exact text matches are found by a dictionary; other ids by rapidfuzz's
    ``process.extractOne`` with the Levenshtein distance over the whole target vocabulary
    (ties: the lowest id). Entries are computed on first use and kept.
    """

    def __init__(self, source_texts: Sequence[str], target_texts: Sequence[str]):
        self.source_texts = list(source_texts)
        self.target_texts = list(target_texts)
        self._exact: dict[str, int] = {}
        for i, t in enumerate(self.target_texts):
            if t:
                self._exact.setdefault(t, i)
        self._choices = {i: t for i, t in enumerate(self.target_texts) if t}
        self._table = np.full(len(self.source_texts), -2, dtype=np.int64)  # -2 = not yet

    def _lookup(self, src: int) -> int:
        from rapidfuzz import process
        from rapidfuzz.distance import Levenshtein

        text = self.source_texts[src]
        if not text:
            return UNMAPPED
        if text in self._exact:
            return self._exact[text]
        best = process.extractOne(text, self._choices, scorer=Levenshtein.distance)
        return UNMAPPED if best is None else int(best[2])

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """Map an integer array of source ids (any shape); out-of-range ids -> ``-1``."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.full(ids.shape, UNMAPPED, dtype=np.int64)
        ok = (ids >= 0) & (ids < len(self._table))
        wanted = np.unique(ids[ok])
        for src in wanted[self._table[wanted] == -2].tolist():
            self._table[src] = self._lookup(src)
        out[ok] = self._table[ids[ok]]
        return out

    def mapped_fraction(self) -> float:
        """Share of the ids looked up so far that found a target token."""
        seen = self._table[self._table != -2]
        return float(np.mean(seen >= 0)) if len(seen) else float("nan")


_MAPS: dict[tuple, VocabMap] = {}


def vocab_map(source_tokenizer, target_tokenizer) -> VocabMap:
    """The (lazily filled) :class:`VocabMap` of a tokenizer pair, cached per direction."""
    key = (tokenizer_key(source_tokenizer), tokenizer_key(target_tokenizer))
    if key not in _MAPS:
        _MAPS[key] = VocabMap(token_texts(source_tokenizer), token_texts(target_tokenizer))
    return _MAPS[key]


def edit_costs(source: Sequence[str], target: Sequence[str]) -> np.ndarray:
    """``[len(source), len(target)]`` Levenshtein distances between token texts."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    if not source or not target:
        return np.zeros((len(source), len(target)), dtype=np.float64)
    return process.cdist(list(source), list(target), scorer=Levenshtein.distance,
                         dtype=np.int32).astype(np.float64)


def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """Dynamic time warping: the monotone path from ``(0, 0)`` to ``(n-1, m-1)`` with the
    least total cost (steps: diagonal, down, right; ties prefer the diagonal)."""
    n, m = cost.shape
    if n == 0 or m == 0:
        return []
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):  # row by row; the inner min is over three neighbours
        row, prev, c = acc[i], acc[i - 1], cost[i - 1]
        for j in range(1, m + 1):
            row[j] = c[j - 1] + min(prev[j - 1], prev[j], row[j - 1])
    path = []
    i, j = n, m
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        steps = (acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])
        k = int(np.argmin(steps))
        i, j = (i - 1, j - 1) if k == 0 else (i - 1, j) if k == 1 else (i, j - 1)
    return path[::-1]


_ALIGNMENTS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def align_positions(source: Sequence[str], target: Sequence[str],
                    min_similarity: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """For each target position, the aligned source position and whether it is usable.

    DTW over token texts; among the source positions the path pairs with target ``j``, the
    one with the smallest edit distance is kept. Usable when both texts are non-empty and
    their normalised similarity ``1 - distance / max(len)`` is at least ``min_similarity``.
    Returns ``(source_index [m] int64, valid [m] bool)``.
    """
    m = len(target)
    index = np.zeros(m, dtype=np.int64)
    valid = np.zeros(m, dtype=bool)
    if not source or not target:
        return index, valid
    cost = edit_costs(source, target)
    best = np.full(m, np.inf)
    for i, j in dtw_path(cost):
        if cost[i, j] < best[j]:
            best[j], index[j] = cost[i, j], i
    for j in range(m):
        a, b = source[index[j]], target[j]
        if a and b:
            valid[j] = 1.0 - best[j] / max(len(a), len(b)) >= min_similarity
    return index, valid


def cached_alignment(pair: tuple, source_ids: Sequence[int], target_ids: Sequence[int],
                     source_texts: Sequence[str], target_texts: Sequence[str]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`align_positions`, cached per tokenizer ``pair`` and pair of id sequences
    (the public set is the same every round)."""
    key = (pair, hash(tuple(source_ids)), hash(tuple(target_ids)))
    if key not in _ALIGNMENTS:
        _ALIGNMENTS[key] = align_positions(source_texts, target_texts)
    return _ALIGNMENTS[key]


def align_topk(values: np.ndarray, indices: np.ndarray, source_index: np.ndarray,
               valid: np.ndarray, vmap: VocabMap) -> tuple[np.ndarray, np.ndarray]:
    """Move a source sequence's top-k ``(values [n, k], indices [n, k])`` onto the target
    sequence and vocabulary.

    Returns ``(values [m, k] float32, indices [m, k] int64)``: row ``j`` is the source row
    aligned with target position ``j``, its token ids mapped by ``vmap``. Entries with no
    target token, non-finite values, and every entry of an unusable position get index
    ``-1`` and value 0 (finite): consumers skip them (:func:`fatellm_flwr.fedmkt.kd_terms`).
    """
    m = len(source_index)
    k = values.shape[1] if values.ndim == 2 else 0
    out_v = np.zeros((m, k), dtype=np.float32)
    out_i = np.full((m, k), UNMAPPED, dtype=np.int64)
    if m == 0 or k == 0 or len(values) == 0:
        return out_v, out_i
    rows = np.clip(source_index, 0, len(values) - 1)
    v = np.asarray(values, dtype=np.float32)[rows]
    idx = vmap(np.asarray(indices)[rows])
    keep = (idx >= 0) & np.isfinite(v) & np.asarray(valid, dtype=bool)[:, None]
    out_v[keep] = v[keep]
    out_i[keep] = idx[keep]
    return out_v, out_i

"""Token alignment for FedMKT: normalisation, vocabulary map, DTW, adversarial inputs."""

import numpy as np
import pytest

from fatellm_flwr.alignment import (
    UNMAPPED,
    VocabMap,
    align_positions,
    align_topk,
    dtw_path,
    edit_costs,
    is_byte_level,
    normalize_token,
    sequence_texts,
    token_texts,
    vocab_map,
)
from fatellm_flwr.testing import build_tiny_sentencepiece_tokenizer, build_tiny_tokenizer


@pytest.fixture(scope="module")
def toks():
    return build_tiny_tokenizer(), build_tiny_sentencepiece_tokenizer()


def test_normalisation_makes_both_families_comparable(toks):
    bpe, sp = toks
    assert is_byte_level(bpe) and not is_byte_level(sp)
    assert normalize_token("Ġthe", True) == " the"
    assert normalize_token("▁the", False) == " the"
    assert normalize_token("Ċ", True) == "\n"
    assert normalize_token("<0x0A>", False) == "\n"
    assert normalize_token("Ã©", True) == "é"  # two byte-level symbols = one UTF-8 char
    assert normalize_token("Ã", True) == "\ufffd"  # half a character
    assert normalize_token(None, True) == "" and normalize_token("", False) == ""
    text = "the team won the match"
    for tok in toks:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert "".join(sequence_texts(tok, ids)).strip() == text


def test_vocab_map_exact_then_nearest(toks):
    vm = VocabMap(["", " the", " t", "zzzz"], ["a", " the", " th", "zz"])
    out = vm(np.array([[0, 1], [2, 3], [7, -3]]))
    assert out.tolist() == [[UNMAPPED, 1], [2, 3], [UNMAPPED, UNMAPPED]]
    assert vm.mapped_fraction() == pytest.approx(3 / 4)
    bpe, sp = toks
    fwd, back = vocab_map(bpe, sp), vocab_map(sp, bpe)
    assert fwd is vocab_map(bpe, sp) and fwd is not back  # cached per direction
    ids = bpe(" the team", add_special_tokens=False)["input_ids"]
    mapped = fwd(np.array(ids))
    assert (mapped >= 0).all() and (mapped < len(sp)).all()
    t_sp, t_bpe = token_texts(sp), token_texts(bpe)
    for s, t in zip(ids, mapped):  # every id maps to its nearest text (min edit distance)
        d = edit_costs([t_bpe[s]], [x for x in t_sp if x])[0].min()
        assert edit_costs([t_bpe[s]], [t_sp[t]])[0, 0] == d


def test_dtw_path_is_monotone_and_cheapest():
    cost = edit_costs([" the", " te", "am", " won"], [" the", " team", " won"])
    path = dtw_path(cost)
    assert path[0] == (0, 0) and path[-1] == (3, 2)
    assert all(b[0] - a[0] in (0, 1) and b[1] - a[1] in (0, 1) and b != a
               for a, b in zip(path, path[1:]))
    # cheapest: " te" stays with " the" (distance 1), "am" pairs with " team" (3)
    assert path == [(0, 0), (1, 0), (2, 1), (3, 2)] and sum(cost[i, j] for i, j in path) == 4
    idx, valid = align_positions([" the", " te", "am", " won"], [" the", " team", " won"])
    # " team" <- "am" has similarity 1 - 3/5 < 0.5: excluded, not guessed
    assert idx.tolist() == [0, 2, 3] and valid.tolist() == [True, False, True]


def test_align_topk_moves_rows_and_maps_ids():
    vm = VocabMap(["a", "b", "c"], ["c", "b", "a", "x"])
    values = np.log(np.array([[0.6, 0.3], [0.5, 0.4]], dtype=np.float32))
    indices = np.array([[0, 1], [2, 7]])
    v, i = align_topk(values, indices, np.array([1, 0, 1]), np.array([True, False, True]), vm)
    assert i.tolist() == [[0, UNMAPPED], [UNMAPPED, UNMAPPED], [0, UNMAPPED]]
    assert v[0, 0] == pytest.approx(np.log(0.5)) and v[1].tolist() == [0.0, 0.0]
    assert np.isfinite(v).all()


ADVERSARIAL = ["", " ", "\n\n", "é!ü漢字🙂", "<unk> <pad>", "the" * 40, "a b c d e f g h",
               "\x00\x01", "▁Ġ▁Ġ", "<0x0A>"]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_adversarial_alignment_is_finite(toks, text):
    """Empty strings, unknown tokens (the Unigram has no byte fallback), byte-level vs
    sentencepiece: every aligned value finite, every id in range or -1."""
    import torch

    from fatellm_flwr.fedmkt import kd_terms

    bpe, sp = toks
    for src, tgt in ((bpe, sp), (sp, bpe)):
        s_ids = src(text, add_special_tokens=False)["input_ids"]
        t_ids = tgt(text, add_special_tokens=False)["input_ids"]
        s_txt, t_txt = sequence_texts(src, s_ids), sequence_texts(tgt, t_ids)
        index, valid = align_positions(s_txt, t_txt)
        assert index.shape == (len(t_ids),) and valid.dtype == bool
        rng = np.random.default_rng(0)
        k = 5
        logits = rng.normal(size=(len(s_ids), len(src)))
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        top = np.argsort(-logp, axis=-1)[:, :k]
        vals = np.take_along_axis(logp, top, -1).astype(np.float32)
        vals[:, -1] = -np.inf  # a teacher entry that underflowed
        v, i = align_topk(vals, top, index, valid, vocab_map(src, tgt))
        assert v.shape == (len(t_ids), k) and np.isfinite(v).all()
        assert ((i == UNMAPPED) | ((i >= 0) & (i < len(tgt)))).all()
        student = torch.log_softmax(torch.randn(len(t_ids), len(tgt)), -1)
        s, c = kd_terms(student, torch.as_tensor(v), torch.as_tensor(i),
                        torch.ones(len(t_ids), dtype=torch.bool))
        assert torch.isfinite(s) and torch.isfinite(c)


def test_empty_sequences():
    idx, valid = align_positions([], [" a"])
    assert idx.tolist() == [0] and valid.tolist() == [False]
    assert dtw_path(np.zeros((0, 3))) == []
    v, i = align_topk(np.zeros((0, 4), np.float32), np.zeros((0, 4), int), idx, valid,
                      VocabMap(["a"], ["a"]))
    assert v.shape == (1, 4) and (i == UNMAPPED).all()

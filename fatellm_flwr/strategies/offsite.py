"""Offsite-tuning server (Xiao, Lin, Han 2023, arXiv 2302.04870; FATE-LLM's FedOST).

The server (model owner) holds the full causal LM of ``L`` decoder blocks. The bottom
``a = offsite-bottom`` and top ``b = offsite-top`` blocks are the trainable *adapters*;
the ``L - a - b`` middle blocks are replaced, on the clients, by a frozen *emulator* of
``n = offsite-emulator-layers`` of them picked at a fixed stride (uniform layer drop),
optionally distilled on public text first (``offsite-distill``). Clients tune the adapters
on their data; every round the server FedAvgs the adapters (or FedAdam/FedYogi/FedAvgM,
:func:`~fatellm_flwr.strategies.homo.build_aggregator`) and plugs them into the full
model (:func:`~fatellm_flwr.emulator.plug_in`). Clients never receive the dropped blocks.

Protocol (Flower's legacy fit/evaluate messages carry float arrays + a config dict; the
keys and records are in :mod:`fatellm_flwr.wire.offsite`):

- Fit/evaluate ``Parameters`` = the adapter tensors only (float32, in
  :func:`~fatellm_flwr.emulator.adapter_parameter_names` order) — exactly what is
  aggregated and what clients return, so Flower's clipping and SecAgg+ mods apply as to
  any update.
- The frozen rest of the emulator (the ``n`` kept middle blocks, embeddings (+ position
  embeddings), final norm and the LM head when untied; a tied head travels once, as the
  embeddings) travels *once per node*, as its own ``ArrayRecord`` (+ a ``ConfigRecord``
  with the emulator id and tensor names) in that node's first fit message: the strategy
  queues it in its :class:`~fatellm_flwr.strategies.outbox.NodeOutbox`, the ServerApp's
  ``OutboxGrid`` attaches it, and the client's ``node_records_mod`` stores it in the
  node's ``context.state``.
- Fit/evaluate config: ``offsite-num-layers`` (L), ``offsite-arch`` (JSON of the
  emulator's transformers config, with its kept-layer map), ``offsite-adapter-names``,
  ``offsite-emulator-id`` (SHA-1 of the architecture and the frozen tensors), and
  ``offsite-frozen-count`` (frozen tensors attached to this message, 0 after the first
  time; informational). Clients rebuild the emulator with
  :func:`~fatellm_flwr.emulator.emulator_from_payload` from these alone: they never load
  the full model (only the tokenizer files of ``model``).
- Caching: a client keeps the frozen part in a process cache (the simulation engine's
  long-lived actors) and in its node's Flower ``context.state`` (which persists per node
  across rounds in simulation *and* in deployment, where each round is a fresh process).
  The server remembers which nodes it sent the frozen part to and sends them only the
  adapters afterwards. Fallback: a node without a copy (state lost) replies
  ``offsite-need-emulator`` with no arrays; it is left out of that round's aggregate and gets the
  frozen part again in the next round it is sampled. A resumed run resends it.

Why cache rather than resend every round: the frozen part is several times larger than
the adapters. SmolLM2-135M (30 blocks, tied head) at a=2, b=2, n=6: adapters 56.7 MB,
frozen emulator 198 MB (6 blocks 84.9 MB + embeddings 113 MB), full model 538 MB. Round 1
sends 255 MB down per client (47% of the full model); later rounds 56.7 MB down and up
(10.5%); resending every round would cost 4.5x the adapter bytes for nothing. The ledger
counts the frozen bytes in the round they travel, plus the config strings.

Client-level DP (server- or client-side clipping), DP-SGD and SecAgg+ work: ``Parameters``
hold only the adapters, so the clipping and delta mods pair what the client returns with
what it received (the base class casts SecAgg+'s float64 aggregate back to float32).

Server evaluation, every round, on the held-out test set (record keys ``server_*``):
``full_zeroshot_*`` (full model, original adapters; computed once), ``emulator_original_*``
(emulator, original adapters; once), ``emulator_tuned_*`` (emulator + aggregated
adapters) and ``plugin_*`` (full model + aggregated adapters: the deliverable, also
reported as the main ``loss``/``accuracy``). The plugged-in full model is saved with
``save_pretrained`` (+ tokenizer) under ``round-XXX/`` and ``final/``; the checkpoint holds
only the adapters (the full model = base + adapters), and a distilled emulator is saved
once in the run folder so a resumed run keeps the emulator its adapters were tuned with.
"""

from __future__ import annotations

import hashlib
import json
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.common import EvaluateIns, FitIns
from flwr.common.logger import log

from ..config import Config, ConfigError
from ..data import collate, load_raw_dataset
from ..emulator import (
    OffsiteSplit,
    adapter_parameter_names,
    blocks_prefix,
    build_emulator,
    client_payload,
    decoder_blocks,
    distill_emulator,
    plug_in,
)
from ..metrics import evaluate_model
from ..models import count_parameters, load_base_model, load_tokenizer
from ..outputs import FULL_MODEL, atomic_write_bytes, atomic_write_json, save_model_folder
from ..wire.common import to_wire
from ..wire.offsite import (
    KEY_ADAPTER_NAMES,
    KEY_ARCH,
    KEY_EMULATOR_ID,
    KEY_FROZEN_COUNT,
    KEY_NUM_LAYERS,
    METRIC_NEED_EMULATOR,
    emulator_records,
    get_named,
    records_nbytes,
    set_named,
)
from .base import TrackedStrategy
from .client_dp import with_client_dp
from .evaluation import HeldOutSet, model_evaluator
from .homo import build_aggregator

DISTILLED_FILE = "offsite-distilled-emulator.safetensors"
DISTILL_LOG = "offsite-distill.json"
_EVALS = ("full_zeroshot", "emulator_original", "emulator_tuned", "plugin")


def check_offsite_config(cfg: Config) -> None:
    """Combinations offsite-tuning cannot run, with what to change."""
    if cfg.quantization != "none":
        raise ConfigError(f"algorithm='offsite' needs quantization='none' (got "
                          f"{cfg.quantization!r}): the emulator is built by copying blocks of "
                          "the server's full-precision model and clients train whole blocks")
    if cfg.offsite_bottom + cfg.offsite_top == 0:
        raise ConfigError("offsite-bottom=0 and offsite-top=0 leave no adapter blocks to train;"
                          " set at least one of them > 0")
    if cfg.offsite_distill and cfg.offsite_emulator_layers == 0:
        raise ConfigError("offsite-distill=true needs offsite-emulator-layers > 0 (an emulator "
                          "of 0 middle blocks has nothing to distil)")
    if cfg.offsite_distill and cfg.offsite_distill_dataset == cfg.dataset:
        raise ConfigError(f"offsite-distill-dataset={cfg.offsite_distill_dataset!r} is the "
                          "clients' dataset: distillation must use public text the server may "
                          "see (e.g. 'builtin:chatterbot')")


def make_split(cfg: Config, num_layers: int) -> OffsiteSplit:
    """The run's :class:`OffsiteSplit` for a model of ``num_layers`` blocks (clear errors)."""
    a, b, n = cfg.offsite_bottom, cfg.offsite_top, cfg.offsite_emulator_layers
    try:
        return OffsiteSplit(num_layers, a, b, n)
    except ValueError as e:
        raise ConfigError(
            f"offsite-bottom={a}, offsite-top={b}, offsite-emulator-layers={n} do not fit "
            f"model {cfg.model!r}, which has {num_layers} decoder blocks: {e}. Allowed: "
            f"offsite-bottom + offsite-top <= {num_layers - 1} and offsite-emulator-layers <= "
            f"{num_layers} - offsite-bottom - offsite-top") from e


def public_text_batches(cfg: Config, tokenizer, count: int) -> list[dict[str, torch.Tensor]]:
    """Up to ``count`` batches of public text (``offsite-distill-dataset``) for distillation.

    Text: the ``text-column`` when present, else instruction (+ input) + output.
    """
    raw = load_raw_dataset(cfg.replace(dataset=cfg.offsite_distill_dataset))
    cols = raw.column_names

    def text(row) -> str:
        if cfg.text_column in cols:
            return str(row[cfg.text_column] or "")
        parts = [row.get(c) for c in (cfg.instruction_column, cfg.input_column,
                                      cfg.output_column) if c in cols]
        return "\n".join(str(p) for p in parts if p)

    if cfg.text_column not in cols and not ({cfg.instruction_column, cfg.output_column}
                                            & set(cols)):
        raise ConfigError(f"offsite-distill-dataset={cfg.offsite_distill_dataset!r} has "
                          f"columns {cols}: no {cfg.text_column!r} or instruction/output "
                          "column to read text from")
    order = np.random.default_rng(cfg.seed).permutation(len(raw))
    texts = []
    for i in order[: count * cfg.batch_size * 2].tolist():
        t = text(raw[i]).strip()
        if t:
            texts.append(t)
        if len(texts) >= count * cfg.batch_size:
            break
    if not texts:
        raise ConfigError(f"offsite-distill-dataset={cfg.offsite_distill_dataset!r} has no text")
    enc = tokenizer(texts, truncation=True, max_length=cfg.max_length,
                    add_special_tokens=False)["input_ids"]
    rows = [{"input_ids": ids, "labels": ids} for ids in enc if ids]
    return [collate(rows[i:i + cfg.batch_size], tokenizer.pad_token_id)
            for i in range(0, len(rows), cfg.batch_size)]


class OffsiteStrategy(TrackedStrategy):
    """Server side of offsite-tuning: full model, emulator, adapter aggregation, plug-in."""

    def __init__(self, cfg: Config, run, initial: list[np.ndarray] | None = None,
                 round_offset: int = 0, ledger=None, strategy_state=None):
        check_offsite_config(cfg)
        self.tokenizer = load_tokenizer(cfg.model, cfg.gguf_file)
        self.full = load_base_model(cfg.model, cfg.gguf_file, "none", cfg.dtype,
                                    cfg.device).eval()
        for p in self.full.parameters():
            p.requires_grad_(False)
        self.split = make_split(cfg, len(decoder_blocks(self.full)))
        self.emulator = build_emulator(self.full, self.split).eval()
        self.adapter_names = adapter_parameter_names(self.emulator, self.split)
        self.original = get_named(self.emulator, self.adapter_names)
        self.distill_losses: list[float] = []
        if cfg.offsite_distill:
            self._distill(cfg, run)
        payload = client_payload(self.emulator)
        adapters = set(self.adapter_names)
        self.frozen_names = [n for n in payload if n not in adapters]
        frozen = {n: payload[n].to("cpu", torch.float32).numpy() for n in self.frozen_names}
        del payload
        self.arch = self.emulator.config.to_json_string(use_diff=False)
        digest = hashlib.sha1(self.arch.encode())
        for name, a in frozen.items():
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(a).tobytes())
        self.emulator_id = digest.hexdigest()[:16]
        self.emulator_records = emulator_records(  # in wire-dtype, like the adapters
            self.emulator_id, dict(zip(frozen, to_wire(list(frozen.values()), cfg.wire_dtype))))
        del frozen
        self.frozen_bytes = records_nbytes(self.emulator_records)
        self._names_json = json.dumps(self.adapter_names)
        initial = initial if initial is not None else [a.copy() for a in self.original]
        _, total = count_parameters(self.full)
        # validation (server-val-size): the deliverable, full model + adapters, only
        validate_fn = model_evaluator(self.full, self.tokenizer, cfg, self.plug,
                                      HeldOutSet(cfg, self.tokenizer, "val"))
        super().__init__(cfg, with_client_dp(cfg, build_aggregator(cfg, initial)), run, initial,
                         full_model_bytes=4 * total, round_offset=round_offset, ledger=ledger,
                         validate_fn=validate_fn)
        if strategy_state:
            self.load_strategy_state(strategy_state)
        self.adapter_bytes = int(sum(a.nbytes for a in self.original))
        self._sent_emulator: set[str] = set()  # nodes (cids) holding the frozen part
        self._baseline: tuple[dict, dict] | None = None
        s = self.split
        info = {"offsite_layers": s.num_layers, "offsite_emulator_blocks": s.emulator_size,
                "offsite_adapter_bytes": self.adapter_bytes,
                "offsite_frozen_emulator_bytes": self.frozen_bytes,
                "offsite_full_model_bytes": 4 * total}
        if self.distill_losses:
            info.update({"offsite_distill_mse_first": self.distill_losses[0],
                         "offsite_distill_mse_last": self.distill_losses[-1]})
        if round_offset == 0:  # shown in the round-0 record
            self._pending.setdefault(0, {}).update(info)
        log(INFO, "Offsite split of %d blocks: adapters %s, emulator keeps %s, drops %s; "
            "adapters %.1f MB, frozen emulator %.1f MB, full model %.1f MB", s.num_layers,
            s.adapter_indices(), s.emulator_indices(), s.dropped_indices(),
            self.adapter_bytes / 1e6, self.frozen_bytes / 1e6, 4 * total / 1e6)

    # ------------------------------------------------------------------ distillation
    def _distill(self, cfg: Config, run) -> None:
        from safetensors.torch import load, save

        prefix = blocks_prefix(self.emulator)
        middle = tuple(f"{prefix}.{p}." for p in self.split.emulator_middle_positions())
        path, log_path = run.path / DISTILLED_FILE, run.path / DISTILL_LOG
        if path.exists():  # resumed run: the emulator the adapters were tuned against
            state = load(path.read_bytes())
            missing = [n for n, _ in self.emulator.named_parameters()
                       if n.startswith(middle) and n not in state]
            if missing:
                raise ValueError(f"{path} does not match this split (lacks {missing[:3]})")
            set_named(self.emulator, list(state), list(state.values()))
            if log_path.exists():
                self.distill_losses = json.loads(log_path.read_text())["mse"]
            log(INFO, "Offsite: loaded the distilled emulator from %s", path)
            return
        batches = public_text_batches(cfg, self.tokenizer, cfg.offsite_distill_steps)
        torch.manual_seed(cfg.seed)
        self.distill_losses = distill_emulator(self.full, self.emulator, self.split, batches,
                                               cfg.offsite_distill_steps, cfg.offsite_distill_lr)
        self.emulator.eval()
        state = {n: p.detach().contiguous() for n, p in self.emulator.named_parameters()
                 if n.startswith(middle)}
        atomic_write_bytes(path, save(state))
        atomic_write_json(log_path, {"dataset": cfg.offsite_distill_dataset,
                                     "steps": cfg.offsite_distill_steps,
                                     "lr": cfg.offsite_distill_lr, "mse": self.distill_losses})
        log(INFO, "Offsite: distilled the emulator on %s for %d steps: MSE %.4g -> %.4g",
            cfg.offsite_distill_dataset, len(self.distill_losses), self.distill_losses[0],
            self.distill_losses[-1])

    # ------------------------------------------------------------------ messages
    def _common_config(self) -> dict:
        return {KEY_NUM_LAYERS: self.split.num_layers, KEY_EMULATOR_ID: self.emulator_id,
                KEY_ARCH: self.arch, KEY_ADAPTER_NAMES: self._names_json}

    def fit_config(self, server_round: int) -> dict:
        return self._common_config()

    def configure_fit(self, server_round, parameters, client_manager):
        instructions = super().configure_fit(server_round, parameters, client_manager)
        rnd = self.absolute(server_round)
        config_bytes = len(self.arch) + len(self._names_json)
        out = []
        for proxy, ins in instructions:
            cid = str(proxy.cid)
            config = dict(ins.config)  # Flower shares one FitIns among all clients
            if cid in self._sent_emulator:
                config[KEY_FROZEN_COUNT] = 0
                out.append((proxy, FitIns(ins.parameters, config)))
                self.ledger.add(rnd, cid, down=config_bytes)
                continue
            config[KEY_FROZEN_COUNT] = len(self.frozen_names)
            self.outbox.put(cid, self.emulator_records)  # its own records, not Parameters
            out.append((proxy, FitIns(ins.parameters, config)))
            self.ledger.add(rnd, cid, down=self.frozen_bytes + config_bytes)
            self._sent_emulator.add(cid)
        return out

    def aggregate_fit(self, server_round, results, failures):
        rnd = self.absolute(server_round)
        need = [(p, r) for p, r in results if r.metrics.get(METRIC_NEED_EMULATOR)]
        for proxy, res in need:
            self._sent_emulator.discard(str(proxy.cid))
            self.outbox.discard(str(proxy.cid))
            log(WARNING, "round %d: client %s (partition %s) has no copy of the emulator; it "
                "is left out of this round and gets the frozen part again next time", rnd,
                proxy.cid, res.metrics.get("partition-id", "?"))
        self.set_aside(rnd, [p.cid for p, _ in need])
        usable = [(p, r) for p, r in results if not r.metrics.get(METRIC_NEED_EMULATOR)]
        # the base class keeps the adapters in their dtype (SecAgg+'s sum is float64)
        params, metrics = super().aggregate_fit(server_round, usable, failures)
        self._pending.setdefault(rnd, {})["clients_need_emulator"] = len(need)
        return params, metrics

    def configure_evaluate(self, server_round, parameters, client_manager):
        instructions = super().configure_evaluate(server_round, parameters, client_manager)
        common = self._common_config()
        return [(proxy, EvaluateIns(ins.parameters, {**ins.config, **common}))
                for proxy, ins in instructions]

    # ------------------------------------------------------------------ evaluation
    def adapter_state(self, arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
        return {n: torch.from_numpy(np.asarray(a)) for n, a in zip(self.adapter_names, arrays)}

    def plug(self, arrays: list[np.ndarray]) -> None:
        """Write adapter arrays into the full model's adapter blocks."""
        plug_in(self.full, self.adapter_state(arrays), self.split)

    def _eval(self, model) -> dict[str, float]:
        task_data, raw, tokenized = self.test_sets()
        return evaluate_model(model, self.tokenizer, raw, tokenized, task_data, self.cfg)

    def evaluate_global(self, arrays: list[np.ndarray]) -> dict[str, float]:
        if len(self.test_sets()[1]) == 0:
            return {}
        if self._baseline is None:
            set_named(self.emulator, self.adapter_names, self.original)
            emulator_original = self._eval(self.emulator)
            self.plug(self.original)
            self._baseline = (self._eval(self.full), emulator_original)
        full_zeroshot, emulator_original = self._baseline
        if all(np.array_equal(a, o) for a, o in zip(arrays, self.original)):
            tuned, plugin = emulator_original, full_zeroshot
        else:
            set_named(self.emulator, self.adapter_names, arrays)
            tuned = self._eval(self.emulator)
            self.plug(arrays)
            plugin = self._eval(self.full)
        out = dict(plugin)  # the deliverable is the main metric: loss, accuracy, ...
        for name, metrics in zip(_EVALS, (full_zeroshot, emulator_original, tuned, plugin)):
            out.update({f"{name}_{k}": v for k, v in metrics.items()})
        return out

    def save_round(self, server_round: int, arrays: list[np.ndarray], folder: Path,
                   final: bool) -> None:
        self.plug(arrays)
        save_model_folder(folder,
                          self.full, self.tokenizer, kind=FULL_MODEL, algorithm="offsite",
                          base_model=self.cfg.model, gguf_file=self.cfg.gguf_file,
                          server_round=server_round)


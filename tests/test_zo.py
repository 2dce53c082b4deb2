"""Tests of the FedKSeed zeroth-order core (fatellm_flwr.zo), on tiny models and tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from fatellm_flwr import zo


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
    oversubscription made these many-small-op tests ~100x slower (0.3 s -> 50 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(path, dtype: torch.dtype = torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _loss_fn(model):
    """Next-token CE on a fixed batch, in the model's dtype (transformers' own loss upcasts
    logits to float32 only, which would cap the float64 test's precision)."""
    ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))

    def loss() -> torch.Tensor:
        logits = model(input_ids=ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    return loss


def _clone(params) -> list[torch.Tensor]:
    return [p.detach().clone() for _, p in params]


# --------------------------------------------------------------------------- seeds and z


def test_z_for_is_a_fixed_function_of_seed_and_index():
    z = zo.z_for((4,), 0, 0)
    assert z.dtype == torch.float32 and z.device.type == "cpu"
    # Golden values: the cross-machine contract (seed derivation + torch CPU randn) must not drift.
    golden = [-1.0096189975738525, -0.7662118673324585, -0.5639866590499878, 0.19893737137317657]
    assert torch.equal(z, torch.tensor(golden))
    big = zo.z_for((33, 17), 123, 5)
    assert torch.equal(big, zo.z_for(torch.Size([33, 17]), 123, 5))
    assert not torch.equal(big, zo.z_for((33, 17), 124, 5))
    assert not torch.equal(big, zo.z_for((33, 17), 123, 6))
    assert abs(big.mean().item()) < 0.1 and abs(big.std().item() - 1) < 0.1
    # Derived generator seeds are 32-bit and injective per tensor / per seed.
    assert len({zo.direction_seed(s, 3) for s in range(5000)}) == 5000
    assert len({zo.direction_seed(77, i) for i in range(5000)}) == 5000
    assert all(0 <= zo.direction_seed(s, i) < 2**32 for s in (0, 2**32 - 1) for i in (0, 999))
    with pytest.raises(ValueError, match="seed"):
        zo.z_for((2,), 2**32, 0)


def test_candidate_seeds_deterministic_distinct_in_range():
    seeds = zo.candidate_seeds(4096, 42)
    assert seeds.dtype == np.int64 and seeds.shape == (4096,)
    assert len(np.unique(seeds)) == 4096
    assert seeds.min() >= 0 and seeds.max() < 2**32
    assert np.array_equal(seeds, zo.candidate_seeds(4096, 42))
    assert not np.array_equal(seeds, zo.candidate_seeds(4096, 43))
    assert zo.candidate_seeds(4, 0).tolist() == [2433363436, 2539140574, 487265508, 1853088626]


# --------------------------------------------------------------------------- probabilities


def _reference_probabilities(histories: list[list[float]], clip: float) -> np.ndarray:
    """Paper Sec. 4.3 written from the per-seed histories: mean |clip(g)|, min-max, softmax."""
    scores = np.array([np.mean(np.abs(np.clip(h, -clip, clip))) if h else 0.0 for h in histories])
    norm = (scores - scores.min()) / (scores.max() - scores.min())
    return np.exp(norm) / np.exp(norm).sum()


def test_seed_history_matches_numpy_reference_and_round_trips():
    k, clip = 7, 2.5
    rng = np.random.default_rng(0)
    hist = zo.SeedHistory(k, bias_loss_clip=clip)
    assert np.allclose(hist.probabilities(), 1 / k)  # round 1: uniform
    histories: list[list[float]] = [[] for _ in range(k)]
    for _ in range(3):  # several rounds, repeated indices inside a batch, seed 6 never drawn
        idx = rng.integers(0, k - 1, size=20)
        gs = rng.normal(0, 3, size=20)
        gs[0] = 1e6  # far beyond the clip
        hist.update(idx, gs)
        for i, g in zip(idx, gs):
            histories[i].append(float(g))
    probs = hist.probabilities()
    expected = _reference_probabilities(histories, clip)
    np.testing.assert_allclose(probs, expected, rtol=1e-12)
    assert probs[6] == probs.min() and abs(probs.sum() - 1) < 1e-12
    assert probs.max() / probs.min() == pytest.approx(np.e)  # softmax of min-max scores
    np.testing.assert_allclose(hist.g_sum, [sum(h) for h in histories], rtol=1e-12)
    assert hist.counts.tolist() == [len(h) for h in histories]

    restored = zo.SeedHistory.from_arrays(hist.to_arrays())
    assert restored.bias_loss_clip == clip
    np.testing.assert_array_equal(restored.probabilities(), probs)
    np.testing.assert_array_equal(restored.g_sum, hist.g_sum)

    draws = zo.sample_seed_indices(probs, 20000, np.random.default_rng(1))
    freq = np.bincount(draws, minlength=k) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.015)
    with pytest.raises(ValueError):
        hist.update([k], [1.0])
    with pytest.raises(ValueError, match="finite"):
        hist.update([0, 1], [1.0, None])


def test_seed_probabilities_uniform_when_all_scores_equal():
    p = zo.seed_probabilities(np.array([2.0, 4.0, 6.0]), np.array([1, 2, 3]))
    np.testing.assert_allclose(p, 1 / 3)


# --------------------------------------------------------------------------- parameters


def test_exclude_embeddings_tied_qwen2(tiny_model_dir):
    model = _load(tiny_model_dir("qwen2"))
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is emb  # precondition: tied
    full = zo.zo_parameters(model, exclude_embeddings=False)
    assert [n for n, _ in full] == [n for n, _ in model.named_parameters()]
    assert sum(p is emb for _, p in full) == 1  # tied weight listed once
    kept = zo.zo_parameters(model, exclude_embeddings=True)
    assert len(kept) == len(full) - 1
    assert not any(p is emb for _, p in kept)  # embedding and the tied head both gone


def test_exclude_embeddings_untied_llama(tiny_model_dir):
    model = _load(tiny_model_dir("llama"))
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert head is not emb
    full = zo.zo_parameters(model, exclude_embeddings=False)
    kept = zo.zo_parameters(model, exclude_embeddings=True)
    assert len(kept) == len(full) - 1
    assert not any(p is emb for _, p in kept)
    assert sum(p is head for _, p in kept) == 1  # untied lm_head stays
    model.model.norm.weight.requires_grad_(False)
    assert len(zo.zo_parameters(model, exclude_embeddings=True)) == len(kept) - 1


def test_embeddings_included_when_key_false_move_embedding_and_tied_head(tiny_model_dir):
    """zo-exclude-embeddings=false: FedKSeed tunes every weight, the input embedding and the
    head tied to it included (one tensor, so one update moves both)."""
    model = _load(tiny_model_dir("qwen2"))
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    before = emb.detach().clone()
    params = zo.zo_parameters(model, exclude_embeddings=False)
    assert sum(p.numel() for _, p in params) == sum(p.numel() for p in model.parameters())
    zo.apply_seed_updates(params, {7: 0.1})
    assert not torch.equal(emb, before) and head is emb
    excluded = zo.zo_parameters(model, exclude_embeddings=True)
    before = emb.detach().clone()
    zo.apply_seed_updates(excluded, {7: 0.1})
    assert torch.equal(emb, before)  # the default leaves both alone


def test_smollm2_share_left_out_by_the_default():
    """The README's figure: on SmolLM2-135M (tied 49152 x 576 embedding) the default
    zo-exclude-embeddings=true leaves out 21.0% of the weights (its config's shapes, built on
    the meta device: no weights loaded)."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    total = sum(p.numel() for _, p in zo.zo_parameters(model, exclude_embeddings=False))
    tuned = sum(p.numel() for _, p in zo.zo_parameters(model, exclude_embeddings=True))
    assert total == 134_515_008 and total - tuned == 49152 * 576
    assert round(1 - tuned / total, 3) == 0.210


# --------------------------------------------------------------------------- steps


def test_zo_estimate_matches_autograd_directional_derivative(tiny_model_dir):
    # GPT-2 runs end to end in float64 (Llama's RMSNorm upcasts to float32, flooring the error at
    # ~1e-4). Central-difference bias grows as eps**2: 1.7e-3 at eps=5e-4, 7e-7 at eps=1e-5.
    model = _load(tiny_model_dir("gpt2"), torch.float64)
    params = zo.zo_parameters(model)
    loss_fn = _loss_fn(model)
    seed = int(zo.candidate_seeds(1, 7)[0])
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(), [p for _, p in params])
    exact = sum(
        float((g * zo.z_for(g.shape, seed, i).double()).sum()) for i, g in enumerate(grads)
    )
    before = _clone(params)
    estimate = zo.zo_step(params, loss_fn, seed, eps=1e-5, lr=0.0)
    assert abs(exact) > 1e-3
    assert abs(estimate - exact) / abs(exact) < 1e-4
    for b, (_, p) in zip(before, params):
        torch.testing.assert_close(p, b, rtol=0, atol=1e-12)


_REPLAY_SCRIPT = """
import json, sys, torch
from fatellm_flwr import zo
start, steps_path, out = sys.argv[1:4]
params = torch.load(start)
cfg = json.load(open(steps_path))
zo.replay_steps(params, [tuple(s) for s in cfg["steps"]], cfg["lr"], cfg["wd"], eps=cfg["eps"])
torch.save(params, out)
"""


def test_replay_in_fresh_process_is_bit_exact(tiny_model_dir, tmp_path):
    model = _load(tiny_model_dir("llama"))
    params = zo.zo_parameters(model)
    loss_fn = _loss_fn(model)
    start = _clone(params)
    torch.save(start, tmp_path / "start.pt")
    cfg = {"lr": 1e-3, "wd": 0.1, "eps": 5e-4}
    seeds = zo.candidate_seeds(16, 1)
    steps = []
    for t, idx in enumerate(np.random.default_rng(0).integers(0, 16, size=6)):
        seed = int(seeds[idx])
        clip = 1e-12 if t == 3 else 0.0  # force one skipped step
        g = zo.zo_step(params, loss_fn, seed, cfg["eps"], cfg["lr"], cfg["wd"], grad_clip=clip)
        steps.append((seed, g))
    assert steps[3][1] is None and all(g is not None for i, (_, g) in enumerate(steps) if i != 3)
    (tmp_path / "steps.json").write_text(json.dumps({**cfg, "steps": steps}))

    repo = str(Path(zo.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-c", _REPLAY_SCRIPT, str(tmp_path / "start.pt"),
         str(tmp_path / "steps.json"), str(tmp_path / "out.pt")],
        check=True, env=env, timeout=120,
    )
    replayed = torch.load(tmp_path / "out.pt")
    assert len(replayed) == len(params)
    assert any(not torch.equal(s, p) for s, (_, p) in zip(start, params))
    for r, (name, p) in zip(replayed, params):
        assert torch.equal(r, p), name

    # Without eps the perturbation round trip is not replayed: same model up to rounding.
    approx = [s.clone() for s in start]
    zo.replay_steps(approx, steps, cfg["lr"], cfg["wd"])
    for a, (_, p) in zip(approx, params):
        torch.testing.assert_close(a, p, rtol=0, atol=1e-6)


def test_apply_seed_updates_equals_sum_of_steps_and_generates_each_z_once(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(8, 5, generator=gen), torch.randn(7, generator=gen),
             torch.randn(3, 4, 2, generator=gen)]
    seeds = [int(s) for s in zo.candidate_seeds(4, 3)]
    rng = np.random.default_rng(0)
    steps = [(seeds[i], float(rng.normal())) for i in rng.integers(0, 4, size=12)]
    lr = 0.01
    expected = [t.clone() for t in start]
    zo.replay_steps(expected, steps, lr)  # sequential per-step updates, wd=0

    coeffs: dict[int, float] = {}
    for s, g in steps:
        coeffs[s] = coeffs.get(s, 0.0) + lr * g
    coeffs[12345] = 0.0  # zero coefficient: nothing to generate
    calls: Counter[int] = Counter()
    real_z_for = zo.z_for

    def counting_z_for(shape, seed, param_index):
        calls[seed] += 1
        return real_z_for(shape, seed, param_index)

    monkeypatch.setattr(zo, "z_for", counting_z_for)
    actual = [t.clone() for t in start]
    zo.apply_seed_updates(actual, coeffs)
    distinct = {s for s, _ in steps}
    assert calls == Counter({s: len(start) for s in distinct})
    for a, e, s in zip(actual, expected, start):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-6)
        assert not torch.allclose(a, s, atol=1e-4)

    reordered = [t.clone() for t in start]
    zo.apply_seed_updates(reordered, dict(reversed(list(coeffs.items()))))
    assert all(torch.equal(r, a) for r, a in zip(reordered, actual))


def test_zo_steps_lower_the_loss(tiny_model_dir):
    model = _load(tiny_model_dir("llama"))
    params = zo.zo_parameters(model)
    loss_fn = _loss_fn(model)
    history = zo.SeedHistory(64)
    seeds = zo.candidate_seeds(64, 0)
    picks = zo.sample_seed_indices(history.probabilities(), 50, np.random.default_rng(0))
    initial = float(loss_fn().detach())
    gs = [zo.zo_step(params, loss_fn, int(seeds[i]), eps=1e-3, lr=2e-3) for i in picks]
    history.update(picks, gs)
    final = float(loss_fn().detach())
    assert final < initial - 0.03, (initial, final)  # ~0.1 observed across seed sets
    assert not np.allclose(history.probabilities(), 1 / 64)


def test_grad_clip_skip_leaves_model_unchanged(tiny_model_dir):
    model = _load(tiny_model_dir("llama"))
    params = zo.zo_parameters(model)
    loss_fn = _loss_fn(model)
    seed = int(zo.candidate_seeds(1, 5)[0])
    before = _clone(params)
    assert zo.zo_step(params, loss_fn, seed, lr=1e-2, grad_clip=1e-9) is None
    for b, (_, p) in zip(before, params):  # only the +eps/-2eps/+eps rounding residue remains
        torch.testing.assert_close(p, b, rtol=0, atol=1e-6)
    g = zo.zo_step(params, loss_fn, seed, lr=1e-2, grad_clip=0.0)
    assert g is not None and abs(g) > 1e-9
    assert max((p - b).abs().max().item() for b, (_, p) in zip(before, params)) > 1e-5
    nan_param = [torch.zeros(3)]
    assert zo.zo_step(nan_param, lambda: torch.tensor(float("nan")), seed) is None


def test_cache_z_is_bit_identical_and_generates_z_once_per_step(tiny_model_dir, monkeypatch):
    """zo-cache-z: the same float operations on the same z (bit-identical weights and g, also
    with weight decay and a skipped step), with one z generation per tensor per step instead
    of three."""
    seeds = [int(s) for s in zo.candidate_seeds(4, 2)]
    runs = {}
    for cache in (False, True):
        model = _load(tiny_model_dir("llama"))
        params = zo.zo_parameters(model)
        loss_fn = _loss_fn(model)
        calls: Counter[int] = Counter()
        real_z_for = zo.z_for

        def counting_z_for(shape, seed, param_index, calls=calls, real_z_for=real_z_for):
            calls[seed] += 1
            return real_z_for(shape, seed, param_index)

        monkeypatch.setattr(zo, "z_for", counting_z_for)
        gs = [zo.zo_step(params, loss_fn, s, eps=1e-3, lr=1e-2, weight_decay=0.1,
                         grad_clip=1e-12 if t == 2 else 0.0, cache_z=cache)
              for t, s in enumerate(seeds)]
        monkeypatch.setattr(zo, "z_for", real_z_for)
        runs[cache] = (gs, _clone(params), calls, len(params))
    (g0, p0, calls0, n), (g1, p1, calls1, _) = runs[False], runs[True]
    assert g0 == g1 and g0[2] is None and all(g is not None for g in g0[:2] + g0[3:])
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert calls0 == Counter({s: 3 * n for s in seeds})
    assert calls1 == Counter({s: n for s in seeds})


def test_threaded_z_work_is_bit_identical_to_one_thread(tiny_model_dir, monkeypatch):
    """z_stream draws z ahead on torch.get_num_threads() workers: every tensor's float
    operations are unchanged, so zo_step (cached or not), replay_steps and apply_seed_updates
    give the same bits with 1 and with 4 threads."""
    monkeypatch.setattr(zo, "PARALLEL_MIN_NUMEL", 0)  # thread the tiny model too
    seeds = [int(s) for s in zo.candidate_seeds(3, 9)]
    out = {}
    for threads in (1, 4):
        torch.set_num_threads(threads)
        model = _load(tiny_model_dir("llama"))
        params = zo.zo_parameters(model)
        loss_fn = _loss_fn(model)
        gs = [zo.zo_step(params, loss_fn, s, eps=1e-3, lr=1e-2, weight_decay=0.1,
                         cache_z=t == 1) for t, s in enumerate(seeds)]
        zo.replay_steps(params, list(zip(seeds, gs)), lr=1e-2, weight_decay=0.1, eps=1e-3)
        zo.apply_seed_updates(params, {s: 1e-3 * (k + 1) for k, s in enumerate(seeds)})
        out[threads] = (gs, _clone(params))
    torch.set_num_threads(1)
    assert out[1][0] == out[4][0]
    assert all(torch.equal(a, b) for a, b in zip(out[1][1], out[4][1]))


def test_z_stream_yields_in_order_from_worker_threads_and_reraises(monkeypatch):
    monkeypatch.setattr(zo, "PARALLEL_MIN_NUMEL", 0)
    torch.set_num_threads(2)
    try:
        jobs = [((3, 2), 11, i) for i in range(9)]
        got = list(zo.z_stream(jobs))
        assert all(torch.equal(z, zo.z_for(*job)) for z, job in zip(got, jobs))
        assert len(got) == 9
        threads: set[str] = set()
        real = zo.z_for

        def recording(shape, seed, index):
            threads.add(threading.current_thread().name)
            if index == 5:
                raise ValueError("tensor 5")
            return real(shape, seed, index)

        monkeypatch.setattr(zo, "z_for", recording)
        with pytest.raises(ValueError, match="tensor 5"):
            list(zo.z_stream(jobs))
        assert threads and all(t.startswith("zo-z") for t in threads)  # drawn on the pool
    finally:
        torch.set_num_threads(1)

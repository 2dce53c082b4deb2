"""FedMKT core: top-k, KD loss, teacher selection, distillation, wire format, config."""

import numpy as np
import pytest
import torch

from fatellm_flwr.config import Config, ConfigError
from fatellm_flwr.fedmkt import (
    Teacher,
    align_sequences,
    distill,
    kd_terms,
    sequence_ce,
    slm_model_for,
    teacher_weights,
    topk_logprobs,
)
from fatellm_flwr.wire.fedmkt import decode_topk, encode_topk, topk_problem


def test_kd_terms_equals_dense_cross_entropy_on_renormalised_topk():
    torch.manual_seed(0)
    logq = torch.log_softmax(torch.randn(4, 10), -1)
    teacher = torch.log_softmax(torch.randn(4, 10), -1)
    vals, idx = teacher.topk(3, -1)
    idx[1, 2] = -1  # an unmapped entry: excluded, the rest renormalised
    idx[3] = -1  # a position without any usable entry: excluded
    mask = torch.tensor([True, True, False, True])  # position 2 is padding
    s, c = kd_terms(logq, vals, idx, mask)
    expected = []
    for t in (0, 1):
        keep = idx[t] >= 0
        p = torch.softmax(vals[t][keep], -1)
        expected.append(-(p * logq[t, idx[t][keep]]).sum())
    assert c == 2 and torch.allclose(s, torch.stack(expected).sum())
    s0, c0 = kd_terms(logq, vals, torch.full_like(idx, -1), mask)
    assert c0 == 0 and s0 == 0 and torch.isfinite(s0)
    bad = vals.clone()
    bad[0, 0] = float("nan")
    s1, _ = kd_terms(logq, bad, idx, mask)
    assert torch.isfinite(s1)


def test_teacher_weights():
    ce = np.array([[1.0, 3.0, np.nan], [2.0, 1.0, 0.5]])
    usable = np.array([[True, True, True], [True, False, False]])
    g = teacher_weights(ce, usable, "greater")
    assert g.tolist() == [[1, 1, 0], [0, 0, 0]]  # example 3: no usable teacher
    w = teacher_weights(ce, usable, "weighted-mean")
    r = np.exp(-1.0) / (np.exp(-1.0) + np.exp(-2.0))
    assert w[:, 0] == pytest.approx([r, 1 - r]) and w[:, 1].tolist() == [1, 0]
    assert w[:, 2].tolist() == [0, 0] and np.isfinite(w).all()


def _model(tiny_model_dir, arch, tokenizer="byte-level", tmp=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fatellm_flwr.testing import build_tiny_model

    path = tiny_model_dir(arch) if tokenizer == "byte-level" else build_tiny_model(
        arch, tmp / f"{arch}-sp", tokenizer="sentencepiece")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _examples(tok, texts):
    out = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        out.append({"input_ids": ids, "labels": [-100] * (len(ids) - 1) + ids[-1:]})
    return out


TEXTS = ["the team won the match . sport", "shares rose in trading . business",
         "a new phone was released . tech", "hello how are you ? i am fine ."]


def test_topk_and_sequence_ce(tiny_model_dir):
    model, tok = _model(tiny_model_dir, "llama")
    ex = _examples(tok, TEXTS)
    topk, ce = topk_logprobs(model, ex, k=5, batch_size=3, pad_id=tok.pad_token_id)
    assert [len(v) for v, _ in topk] == [len(e["input_ids"]) for e in ex]
    for v, i in topk:
        assert v.dtype == np.float32 and i.dtype == np.int32 and v.shape[1] == 5
        assert np.isfinite(v).all() and (v <= 0).all() and (np.diff(v, axis=1) <= 0).all()
    # CE of example 0 on its one label token, computed directly
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ex[0]["input_ids"]])).logits[0]
    ids = ex[0]["input_ids"]
    direct = -torch.log_softmax(logits[-2], -1)[ids[-1]]
    assert ce[0] == pytest.approx(float(direct), rel=1e-4)
    labels = torch.full((1, 3), -100)
    assert float(sequence_ce(torch.zeros(1, 3, 4), labels)[0]) == 0.0


def test_distill_moves_student_towards_teacher_across_tokenizers(tiny_model_dir, tmp_path):
    """A llama (byte-level BPE) teaches a gpt2 with a sentencepiece-style tokenizer."""
    teacher, t_tok = _model(tiny_model_dir, "llama")
    student, s_tok = _model(tiny_model_dir, "gpt2", "sentencepiece", tmp_path)
    assert len(t_tok) != len(s_tok)
    t_ex, s_ex = _examples(t_tok, TEXTS), _examples(s_tok, TEXTS)
    topk, _ = topk_logprobs(teacher, t_ex, k=8, batch_size=4, pad_id=t_tok.pad_token_id)
    aligned = align_sequences(t_tok, s_tok, t_ex, s_ex, topk)
    assert [len(v) for v, _ in aligned] == [len(e["input_ids"]) for e in s_ex]
    assert any((i >= 0).any() for _, i in aligned)
    teachers = [[Teacher(1.0, a)] for a in aligned]

    def kd_now():
        out = []
        with torch.no_grad():
            for e, (v, i) in zip(s_ex, aligned):
                logq = torch.log_softmax(student(input_ids=torch.tensor([e["input_ids"]]))
                                         .logits[0].float(), -1)
                s, c = kd_terms(logq, torch.as_tensor(v), torch.as_tensor(i).long(),
                                torch.ones(len(v), dtype=torch.bool))
                if c > 0:
                    out.append(float(s / c))
        return float(np.mean(out))

    before = kd_now()
    torch.manual_seed(0)
    m = distill(student, s_ex, teachers, lam=1.0, lr=1e-2, epochs=15, batch_size=2,
                pad_id=s_tok.pad_token_id)
    assert m["distill_steps"] == 30 and m["distill_skipped_steps"] == 0
    assert m["distill_kd_positions"] > 0 and np.isfinite(m["distill_kd_loss"])
    assert kd_now() < before - 0.1


def test_distill_skips_non_finite_steps(tiny_model_dir):
    model, tok = _model(tiny_model_dir, "llama")
    ex = _examples(tok, TEXTS[:2])
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    m = distill(model, ex, [[], []], lam=0.5, lr=1e-3, epochs=1, batch_size=2,
                pad_id=tok.pad_token_id)
    assert m["distill_skipped_steps"] == 1 and m["distill_steps"] == 0


def test_wire_round_trip_and_rejections():
    rng = np.random.default_rng(0)
    topk = [(-rng.random((n, 4)).astype(np.float32), rng.integers(0, 50, (n, 4)))
            for n in (3, 5)]
    arrays = encode_topk(topk, np.array([1.5, 2.0]))
    assert [a.dtype for a in arrays] == [np.float32, np.int32, np.int32, np.float32]
    assert topk_problem(arrays, [3, 5], 4, 50, with_ce=True) is None
    back, ce = decode_topk(arrays)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
               for a, b in zip(topk, back)) and ce.tolist() == [1.5, 2.0]
    nan = [a.copy() for a in arrays]
    nan[0][1, 2] = np.nan
    assert "NaN" in topk_problem(nan, [3, 5], 4, 50, with_ce=True)
    inf_ce = [a.copy() for a in arrays]
    inf_ce[3][0] = np.inf
    assert "NaN/Inf" in topk_problem(inf_ce, [3, 5], 4, 50, with_ce=True)
    assert "lengths" in topk_problem(arrays, [3, 4], 4, 50, with_ce=True)
    assert "vocabulary" in topk_problem(arrays, [3, 5], 4, 10, with_ce=True)
    assert "expected 4" in topk_problem(arrays[:2], [3, 5], 4, 50, with_ce=True)


def test_config_keys_and_slm_assignment():
    cfg = Config.from_run_config({"algorithm": "fedmkt", "slm-models": "a,b,c"})
    assert [slm_model_for(cfg, {}, i) for i in range(3)] == ["a", "b", "c"]
    assert slm_model_for(cfg, {"slm-model": "mine"}, 1) == "mine"
    with pytest.raises(ConfigError, match="partition-id 5"):
        slm_model_for(cfg, {}, 5)
    one = Config.from_run_config({"algorithm": "fedmkt", "slm-models": "x"})
    assert slm_model_for(one, {}, 7) == "x"
    with pytest.raises(ConfigError, match="fedmkt-selection"):
        Config.from_run_config({"fedmkt-selection": "best"})
    with pytest.raises(ConfigError, match="public-dataset=.*clients' dataset"):
        Config.from_run_config({"algorithm": "fedmkt", "public-dataset": "builtin:bbc-news"})
    with pytest.raises(ConfigError, match="fedmkt-public-size=100 must be smaller"):
        Config.from_run_config({"algorithm": "fedmkt", "fedmkt-public-size": 100})
    with pytest.raises(ConfigError, match="secure-aggregation does not apply"):
        Config.from_run_config({"algorithm": "fedmkt", "secure-aggregation": True})
    with pytest.raises(ConfigError, match="slm-models is empty"):
        Config.from_run_config({"algorithm": "fedmkt", "slm-models": " , "})

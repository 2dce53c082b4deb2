"""InferDPT core: the exponential mechanism's distribution, RANTEXT perturbation, extraction,
and the client/strategy exchange driven in-process."""

import json

import numpy as np
import pytest
import torch

from fatellm_flwr.clients.inferdpt import InferDPTClient
from fatellm_flwr.config import Config
from fatellm_flwr.privacy import inferdpt as D
from fatellm_flwr.testing import FakeClientManager


def test_exponential_mechanism_probabilities_match_the_formula():
    u = torch.tensor([0.0, -0.5, -1.0, -2.0])
    p = D.exponential_mechanism_probs(u, epsilon=3.0, sensitivity=2.0)
    expected = torch.exp(3.0 * u / 4.0)
    assert torch.allclose(p, expected / expected.sum(), atol=1e-6)
    assert torch.allclose(D.exponential_mechanism_probs(u, 1.0, 0.0), torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="epsilon"):
        D.exponential_mechanism_probs(u, 0.0, 1.0)


def test_sampled_tokens_follow_the_exponential_mechanism():
    # 1-D embeddings: tokens 0..4 at 0, .5, 1, 1.5, 2; token 5 far away sets a huge Laplace
    # scale, so the random adjacency keeps all top-5 neighbours
    emb = torch.tensor([[0.0], [0.5], [1.0], [1.5], [2.0], [400.0]])
    pert = D.Perturber(emb, top_k=5)
    gen = torch.Generator().manual_seed(0)
    eps, n = 4.0, 20000
    draws = np.bincount([pert.sample(0, eps, gen) for _ in range(n)], minlength=6)
    dist = np.array([0.0, 0.5, 1.0, 1.5, 2.0])
    expected = np.exp(eps * -dist / (2 * 2.0))  # utility -d, sensitivity = range of d = 2
    expected /= expected.sum()
    freq = draws[:5] / n
    assert draws[5] == 0  # outside the top-k neighbourhood
    assert np.abs(freq - expected).max() < 0.015
    # chi-square goodness of fit, 4 degrees of freedom: 99.9% quantile is 18.47
    chi2 = float((((draws[:5] - n * expected) ** 2) / (n * expected)).sum())
    assert chi2 < 18.47


def test_more_epsilon_keeps_more_tokens(tiny_model_dir):
    from fatellm_flwr.models import load_base_model, load_tokenizer

    path = str(tiny_model_dir("llama"))
    tok, model = load_tokenizer(path), load_base_model(path)
    pert = D.perturber_for(model, tok, top_k=16)
    text = "the quick brown fox jumps over the lazy dog . what is the capital of france ?"
    gen = torch.Generator().manual_seed(1)
    same = {eps: np.mean([D.perturb_text(text, tok, pert, eps, gen)[1] for _ in range(20)])
            for eps in (0.5, 4.0, 50.0)}
    assert same[0.5] < same[4.0] < same[50.0]
    assert D.perturb_text(text, tok, pert, 0.0, gen) == (text, 1.0)  # epsilon 0: no noise
    out, _ = D.perturb_text(text, tok, pert, 0.5, gen)
    assert out != text and all(s not in out for s in tok.all_special_tokens)


def test_extraction_prompt_holds_the_original_and_the_draft():
    p = D.extraction_prompt("  What is the capital of France? ", "Paris is big.\n")
    assert "Question: What is the capital of France?" in p
    assert "Draft answer: Paris is big." in p and p.endswith("Answer:")


def test_pipeline_never_shows_the_original_prompt_to_the_remote():
    emb = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))

    class Tok:  # one character per token
        all_special_ids: list = []

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) - 97 for c in text]}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i + 97) for i in ids)

    seen = []

    def remote(prompts):
        seen.extend(prompts)
        return [p.upper() for p in prompts]

    client = D.InferDPT(lambda ps: [f"final:{p[-12:]}" for p in ps], Tok(),
                        D.Perturber(emb, top_k=8), epsilon=1.0, seed=0)
    out = client(["abcdefghijklmnop"], remote)
    assert seen == [out[0].perturbed_prompt] and seen[0] != "abcdefghijklmnop"
    assert out[0].perturbed_answer == seen[0].upper()
    assert out[0].answer.startswith("final:") and 0 <= out[0].unchanged < 1


def test_client_and_strategy_exchange_in_process(tiny_model_dir, tmp_path):
    from fatellm_flwr.outputs import RunDir
    from fatellm_flwr.strategies.inferdpt import InferDPTStrategy

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"what is the capital of france ? {i}",
                                        "output": "paris is the capital ."}) + "\n"
                            for i in range(20)))
    cfg = Config.from_run_config({
        "algorithm": "inferdpt", "model": str(tiny_model_dir("llama")), "dataset": str(data),
        "test-size": 2, "inferdpt-queries": 2, "max-new-tokens": 4, "partitioner": "iid",
        "output-dir": str(tmp_path / "out"), "inferdpt-epsilon": 1.0, "inferdpt-top-k": 8})
    clients = [InferDPTClient(cfg, p, 2) for p in range(2)]
    seen = []
    strategy = InferDPTStrategy(cfg, RunDir(tmp_path / "run"),
                                remote=lambda ps: seen.extend(ps) or ["ok"] * len(ps))
    mgr = FakeClientManager(2)
    fit = strategy.configure_fit(1, strategy.initialize_parameters(mgr), mgr)

    class Res:
        def __init__(self, out):
            self.parameters, self.num_examples, self.metrics = None, out[1], out[2]

    results = [(proxy, Res(clients[int(proxy.cid)].fit([], ins.config))) for proxy, ins in fit]
    strategy.aggregate_fit(1, results, [])
    assert len(seen) == 4 and not any("capital of france ? 0" == s for s in seen)
    evals = strategy.configure_evaluate(1, None, mgr)
    assert {p.cid for p, _ in evals} == {"0", "1"}
    replies = []
    for proxy, ins in evals:
        loss, n, metrics = clients[int(proxy.cid)].evaluate([], ins.config)
        assert n == 2 and 0 <= metrics["inferdpt_unchanged"] <= 1
        replies.append((proxy, type("R", (), {"num_examples": n, "metrics": metrics,
                                              "loss": loss})()))
    strategy.aggregate_evaluate(1, replies, [])
    rec = strategy.run.records[-1]
    assert rec["queries"] == 4 and rec["bytes_up"] > 0 and rec["bytes_down"] > 0
    lines = (tmp_path / "out" / "inferdpt-answers-0.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["remote_answer"] == "ok"


@pytest.mark.parametrize("extra, match", [
    ({"secure-aggregation": True}, "secure-aggregation does not apply to algorithm='inferdpt'"),
    ({"inferdpt-epsilon": -1.0}, "'inferdpt-epsilon' has value -1.0"),
    ({"inferdpt-top-k": 1}, "'inferdpt-top-k' has value 1"),
])
def test_bad_inferdpt_settings_are_refused(extra, match):
    from fatellm_flwr.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        Config.from_run_config({"algorithm": "inferdpt", **extra})

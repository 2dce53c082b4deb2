"""InferDPT end to end in the simulation engine: a tiny local model per client, a tiny remote
model on the server; prompts travel perturbed, final answers stay on the nodes."""

import json


def test_inferdpt_round_trip(run_flwr, tiny_model_dir, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"what is the capital of france ? {i}",
                                        "output": "paris is the capital ."}) + "\n"
                            for i in range(40)))
    out = tmp_path / "out"
    log = run_flwr({
        "algorithm": "inferdpt", "model": str(tiny_model_dir("llama")),
        "inferdpt-remote-model": str(tiny_model_dir("gpt2")), "dataset": str(data),
        "test-size": 4, "num-server-rounds": 2, "inferdpt-queries": 3, "max-new-tokens": 6,
        "inferdpt-epsilon": 1.0, "inferdpt-top-k": 16, "partitioner": "iid",
        "min-available-clients": 2, "min-fit-clients": 2, "output-dir": str(out),
        "run-name": "dpt", "plots": False}, num_supernodes=2)
    assert "remote LLM answered 6 perturbed prompts" in log
    records = json.loads((out / "dpt" / "metrics.json").read_text())
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert r["queries"] == 6 and r["clients_ok"] == 2
        assert 0 <= r["eval_inferdpt_unchanged"] < 1  # epsilon 1: most tokens replaced
        assert 0 <= r["eval_rouge-l"] <= 1 and r["bytes_up"] > 0 and r["bytes_down"] > 0
    for p in range(2):
        rows = [json.loads(x) for x in (out / f"inferdpt-answers-{p}.jsonl").read_text()
                .splitlines()]
        assert len(rows) == 6 and {r["round"] for r in rows} == {1, 2}
        assert all(r["sent"] != r["prompt"] for r in rows)

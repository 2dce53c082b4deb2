"""1,000 registered SuperNodes, 10 sampled per round, tiny model, on 2 CPU cores.

900 training examples for 1,000 IID partitions: the last 100 partitions are empty, and a
sampled client holding one is skipped with a logged reason (not a failure), so every
round ends with ok + skipped = 10 and no failure.
"""

import json

import pytest


@pytest.mark.slow
def test_thousand_supernodes_ten_sampled(run_flwr, tiny_model_dir, tmp_path):
    data = tmp_path / "topics.jsonl"
    words = {"sport": "the team won the match", "business": "shares rose in trading",
             "tech": "a new phone was released"}
    with data.open("w") as f:
        for i in range(1000):
            label = list(words)[i % 3]
            f.write(json.dumps({"text": f"{words[label]} {i}", "label": label}) + "\n")
    out = tmp_path / "out"
    log = run_flwr({"model": str(tiny_model_dir("llama")), "dataset": str(data),
                    "test-size": 100, "max-examples": 0, "partitioner": "iid",
                    "val-fraction": 0.0, "num-server-rounds": 2, "local-steps": 1,
                    "batch-size": 2, "max-length": 32, "fraction-fit": 0.01,
                    "min-fit-clients": 10, "min-available-clients": 1000,
                    "fraction-evaluate": 0.0, "plots": False, "output-dir": str(out),
                    "run-name": "scale"}, num_supernodes=1000, timeout=900)
    records = json.loads((out / "scale" / "metrics.json").read_text())
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert r["clients_ok"] + r["clients_skipped"] == 10, r
        assert r["clients_failed"] == 0, r
    skipped = sum(r["clients_skipped"] for r in records[1:])
    assert log.count("is empty") >= skipped  # each skip is logged with its reason
    peak = json.loads((out / "scale" / "server_resources.json").read_text())["peak_rss_mb"]
    print(f"1000 supernodes: ServerApp peak RSS {peak:.0f} MB, round times "
          f"{[round(r['round_time_s'], 1) for r in records[1:]]} s, skipped {skipped}")

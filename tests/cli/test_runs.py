"""fatellm_flwr.cli.runs: listing runs, finding and loading their models, clear errors."""

import json
import shutil

import pytest
import torch

from fatellm_flwr.cli.runs import (
    RunError,
    list_runs,
    load_run_model,
    model_folder,
    read_run,
    runs_table,
)
from fatellm_flwr.outputs import MODEL_MANIFEST


def test_list_runs_table(cli_runs):
    infos = {i.path.name: i for i in list_runs(cli_runs["homo"].parent)}
    assert set(infos) >= {"homo", "fedkseed", "offsite"}
    for name in ("homo", "fedkseed", "offsite"):
        info = infos[name]
        assert info.algorithm == name and info.status == "finished"
        assert (info.rounds_done, info.rounds_planned) == (2, 2)
        assert info.metric == "accuracy" and info.first is not None and info.last is not None
        assert info.bytes_total > 0
    table = runs_table(list(infos.values()))
    assert "| homo " in table and "2/2" in table and "finished" in table


def test_every_model_folder_has_a_manifest_naming_the_base_as_given(cli_runs):
    for name, run in cli_runs.items():
        base = json.loads((run / "config.json").read_text())["model"]
        for folder in (run / "final", run / "round-001", run / "round-002"):
            manifest = json.loads((folder / MODEL_MANIFEST).read_text())
            assert manifest["algorithm"] == name and manifest["base_model"] == base
    homo_final = cli_runs["homo"] / "final"
    assert (homo_final / "tokenizer_config.json").exists()
    adapter = json.loads((homo_final / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == \
        json.loads((cli_runs["homo"] / "config.json").read_text())["model"]


def test_unfinished_run_is_resumable_and_uses_its_last_round(cli_runs, tmp_path):
    run = tmp_path / "cut"
    shutil.copytree(cli_runs["homo"], run)
    shutil.rmtree(run / "final")  # as a run stopped after round 2's checkpoint leaves it
    shutil.rmtree(run / "round-002")
    (run / "checkpoint.json").write_text(json.dumps({"round": 1, "algorithm": "homo"}))
    assert read_run(run).status == "resumable"
    assert model_folder(run) == run / "round-001"
    model, tok, manifest = load_run_model(run)
    assert manifest["round"] == 1


def test_fedkseed_round_coefficients_replay_to_the_final_model(cli_runs):
    run = cli_runs["fedkseed"]
    final, tok, _ = load_run_model(run)
    replayed, _, manifest = load_run_model(run / "round-002")
    assert manifest["format"] == "fedkseed-coefficients"
    ids = tok(["the team won the match"], return_tensors="pt")
    with torch.no_grad():
        a, b = final(**ids).logits, replayed(**ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    first, _, _ = load_run_model(run / "round-001")
    with torch.no_grad():
        assert not torch.allclose(first(**ids).logits, a)


def test_errors_name_the_problem(cli_runs, tmp_path):
    with pytest.raises(RunError, match="not a run folder"):
        read_run(tmp_path)
    with pytest.raises(RunError, match="does not exist"):
        list_runs(tmp_path / "nope")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(cli_runs["homo"] / "config.json", fresh / "config.json")
    assert read_run(fresh).status == "not started"
    with pytest.raises(RunError, match="no finished round"):
        load_run_model(fresh)
    moved = tmp_path / "moved"
    shutil.copytree(cli_runs["homo"], moved)
    manifest_path = moved / "final" / MODEL_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest.update(base_model=str(tmp_path / "gone"), base_model_abspath=str(tmp_path / "gone"))
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(RunError, match="base model .*gone.* cannot be loaded"):
        load_run_model(moved)

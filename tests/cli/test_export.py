"""fatellm_flwr.cli.export: standalone Hugging Face folders that plain transformers loads."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fatellm_flwr.cli import RunError, export, load_run_model


def _logits(model, tok):
    ids = tok(["the team won the match", "a new phone"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits


def test_merged_export_matches_base_plus_adapter(cli_runs, tmp_path):
    run = cli_runs["homo"]
    out = export(run, tmp_path / "merged", merge=True)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    peft_model, peft_tok, _ = load_run_model(run)
    assert not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(_logits(model, tok), _logits(peft_model, peft_tok),
                               atol=1e-5, rtol=1e-5)
    base = json.loads((run / "config.json").read_text())["model"]
    for f in out.glob("*.json"):  # nothing points back at the base folder or a cache
        assert base not in f.read_text() and "fatellm_flwr" not in f.read_text(), f
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and '"algorithm": "homo"' in card
    assert "server_accuracy" in card


def test_adapter_export_keeps_the_base_reference(cli_runs, tmp_path):
    out = export(cli_runs["homo"], tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == \
        json.loads((cli_runs["homo"] / "config.json").read_text())["model"]
    assert (out / "tokenizer_config.json").exists()
    with pytest.raises(RunError, match="not empty"):
        export(cli_runs["homo"], out)


@pytest.mark.parametrize("algorithm", ["fedkseed", "offsite"])
def test_full_model_runs_export_the_same_way(cli_runs, tmp_path, algorithm):
    out = export(cli_runs[algorithm], tmp_path / algorithm, merge=True)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ref, tok, _ = load_run_model(cli_runs[algorithm])
    torch.testing.assert_close(_logits(model, AutoTokenizer.from_pretrained(out)),
                               _logits(ref, tok))

"""fatellm_flwr.outputs: self-contained model folders (tokenizer, manifest, base as given)."""

import json

import pytest
import torch

from fatellm_flwr.outputs import (
    FULL_MODEL,
    MODEL_MANIFEST,
    PEFT_ADAPTER,
    model_manifest,
    save_model_folder,
)


@pytest.fixture()
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dir("llama")
    base = AutoModelForCausalLM.from_pretrained(path)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    return path, model, AutoTokenizer.from_pretrained(path)


def test_adapter_folder_is_self_contained(lora_model, tmp_path):
    path, model, tok = lora_model
    out = save_model_folder(tmp_path / "final", model, tok, kind=PEFT_ADAPTER,
                            algorithm="homo", base_model="builtin:smollm2-135m-instruct",
                            server_round=3)
    adapter = json.loads((out / "adapter_config.json").read_text())
    # the reference the user gave, never the folder the loader resolved it to
    assert adapter["base_model_name_or_path"] == "builtin:smollm2-135m-instruct"
    manifest = json.loads((out / MODEL_MANIFEST).read_text())
    assert manifest == {"format": PEFT_ADAPTER, "algorithm": "homo", "round": 3,
                        "base_model": "builtin:smollm2-135m-instruct", "gguf_file": ""}
    assert (out / "tokenizer_config.json").exists() and (out / "tokenizer.json").exists()
    assert not list(tmp_path.glob(".final.*"))  # no temp folder left behind


def test_full_model_folder_loads_with_transformers(lora_model, tmp_path):
    from transformers import AutoModelForCausalLM

    path, model, tok = lora_model
    base = model.get_base_model()
    out = save_model_folder(tmp_path / "round-001", base, tok, kind=FULL_MODEL,
                            algorithm="offsite", base_model=str(path), server_round=1,
                            extra_files={"extra.bin": b"xyz"})
    assert (out / "extra.bin").read_bytes() == b"xyz"
    assert json.loads((out / MODEL_MANIFEST).read_text())["base_model_abspath"] == \
        str(path.resolve())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_saving_again_replaces_the_folder(lora_model, tmp_path):
    path, model, tok = lora_model
    out = tmp_path / "final"
    save_model_folder(out, model, tok, kind=PEFT_ADAPTER, algorithm="homo",
                      base_model="m", server_round=1)
    (out / "stale.txt").write_text("old")
    save_model_folder(out, model, tok, kind=PEFT_ADAPTER, algorithm="homo",
                      base_model="m", server_round=2)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / MODEL_MANIFEST).read_text())["round"] == 2


def test_manifest_keeps_hub_ids_as_given():
    m = model_manifest(FULL_MODEL, "fedkseed", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert m["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base_model_abspath" not in m

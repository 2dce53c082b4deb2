import numpy as np
import pytest
import torch
from peft import PeftModel

from fatellm_flwr.config import Config
from fatellm_flwr.models import (
    ModelLoadError,
    check_quantization_support,
    find_target_modules,
    get_trainable_state,
    load_base_model,
    load_tokenizer,
    save_adapter,
    set_trainable_state,
    trainable_names,
    wrap_peft,
)

EXPECTED_TARGETS = {
    "llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "qwen2": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "gemma3": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "gpt2": ["c_attn", "c_fc", "c_proj"],
    "opt": ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"],
}


def _batch(tok, n=4):
    texts = ["the team won the match", "shares rose in trading", "paris is the capital .",
             "a new phone was released"][:n]
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return {**enc, "labels": labels}


def test_target_modules_found_from_each_architecture(tiny_model_dir, any_arch):
    model = load_base_model(str(tiny_model_dir(any_arch)))
    assert find_target_modules(model) == EXPECTED_TARGETS[any_arch]


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt-tuning", "prefix-tuning"])
def test_every_peft_method_lowers_the_loss(tiny_model_dir, method):
    path = str(tiny_model_dir("llama"))
    cfg = Config.from_run_config({"model": path, "peft-method": method, "lora-dropout": 0.0,
                                  "num-virtual-tokens": 4})
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    model = wrap_peft(load_base_model(path), cfg)
    batch = _batch(tok)
    # soft prompts move the loss slowly on a random model: they get a larger step
    lr = 0.3 if method == "prompt-tuning" else 3e-2
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    with torch.no_grad():
        before = model(**batch).loss.item()
    for _ in range(20):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < before - 0.05, (method, before, after)
    # base weights untouched: only adapter tensors are trainable
    assert all("lora" in n or "ia3" in n or "prompt" in n or "prefix" in n
               for n in trainable_names(model))


def test_trainable_state_round_trip_stable_names(tiny_model_dir):
    path = str(tiny_model_dir("gpt2"))
    cfg = Config.from_run_config({"model": path})
    torch.manual_seed(0)
    a = wrap_peft(load_base_model(path), cfg)
    torch.manual_seed(1)
    b = wrap_peft(load_base_model(path), cfg)
    assert trainable_names(a) == trainable_names(b)
    state = get_trainable_state(a)
    assert all(x.dtype == np.float32 for x in state)
    set_trainable_state(b, state)
    for x, y in zip(get_trainable_state(b), state):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="expected"):
        set_trainable_state(b, state[:-1])
    with pytest.raises(ValueError, match="has shape"):
        set_trainable_state(b, [s.T if s.ndim == 2 and s.shape[0] != s.shape[1] else s
                                for s in state][::-1])


def test_saved_adapter_loads_with_peft_and_gives_identical_logits(tiny_model_dir, tmp_path):
    path = str(tiny_model_dir("qwen2"))
    cfg = Config.from_run_config({"model": path})
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    model = wrap_peft(load_base_model(path), cfg)
    # make the adapter non-trivial (LoRA B starts at zero)
    set_trainable_state(model, [np.random.default_rng(0).normal(size=s.shape).astype(np.float32)
                                * 0.1 for s in get_trainable_state(model)])
    out = save_adapter(model, tmp_path / "adapter")
    assert (out / "adapter_config.json").exists()
    loaded = PeftModel.from_pretrained(load_base_model(path), out)
    batch = _batch(tok)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, loaded(**batch).logits)
    # saving again over an existing folder replaces it atomically
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_missing_target_modules_are_named(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    cfg = Config.from_run_config({"model": path, "target-modules": "q_proj,query_key_value"})
    with pytest.raises(ValueError, match=r"\['query_key_value'\] not found.*q_proj"):
        wrap_peft(load_base_model(path), cfg)


def test_unknown_model_offline_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="could not load model 'no-such-org/no-such-model'"):
        load_base_model("no-such-org/no-such-model")


def test_quantization_probe_reports_what_is_needed(monkeypatch):
    import bitsandbytes as bnb

    check_quantization_support("8bit")  # works on this machine (measured)

    class Broken(torch.nn.Module):
        def __init__(self, *a, **k):
            raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnb.nn, "Linear4bit", Broken)
    with pytest.raises(ModelLoadError, match=r"quantization='4bit' is not supported.*needs"):
        check_quantization_support("4bit")


def test_8bit_lora_trains_one_round_on_cpu(tiny_model_dir, tiny_classification_file):
    """QLoRA-style: 8-bit base (bitsandbytes CPU kernels) + LoRA, one client round."""
    from fatellm_flwr.clients.homo import HomoClient
    from fatellm_flwr.models import clear_model_cache

    clear_model_cache()
    cfg = Config.from_run_config({"model": str(tiny_model_dir("llama")), "quantization": "8bit",
                                  "dataset": str(tiny_classification_file), "test-size": 12,
                                  "max-examples": 0, "local-steps": 6, "lr": 5e-3,
                                  "lora-dropout": 0.0, "max-length": 64, "partitioner": "iid"})
    client = HomoClient(cfg, partition_id=0, num_partitions=2)
    assert any("8bit" in type(m).__name__ for m in client.model.modules())
    from fatellm_flwr.train import evaluate_loss

    def train_loss():
        return evaluate_loss(client.model, client.train, 8, client.tokenizer.pad_token_id)

    start = client.get_parameters({})
    loss0 = train_loss()
    new, _, metrics = client.fit(start, {"server-round": 1})
    assert np.isfinite(metrics["train_loss"]) and train_loss() < loss0
    clear_model_cache()

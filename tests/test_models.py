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
from fatellm_flwr.testing import ARCHITECTURES, MORE_ARCHITECTURES, build_tiny_model

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


def _ia3_layers(model):
    from peft.tuners.ia3 import IA3Layer

    return {n.split("base_model.model.", 1)[-1]: m for n, m in model.named_modules()
            if isinstance(m, IA3Layer)}


def test_ia3_on_grouped_query_attention_scales_key_and_value_outputs(tiny_model_dir):
    """IA3 (Liu et al. 2022) rescales the *outputs* of k and v and the *input* of the MLP's
    down projection. On grouped-query attention k/v narrow (32 -> 16 here, 576 -> 192 in
    SmolLM2) without being feed-forward."""
    path = str(tiny_model_dir("llama"))
    base = load_base_model(path)
    assert base.config.num_key_value_heads < base.config.num_attention_heads
    k = base.model.layers[0].self_attn.k_proj
    assert k.in_features > k.out_features  # the shape that fooled the old rule
    cfg = Config.from_run_config({"model": path, "peft-method": "ia3",
                                  "target-modules": "k_proj,v_proj,down_proj"})
    model = wrap_peft(base, cfg)
    layers = _ia3_layers(model)
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"k_proj", "v_proj", "down_proj"}
    for name, layer in layers.items():
        vec = layer.ia3_l["default"]
        if name.endswith("down_proj"):
            assert layer.is_feedforward and vec.shape == (1, layer.in_features)  # input, 64
        else:
            assert not layer.is_feedforward and vec.shape == (layer.out_features, 1)  # 16
            assert layer.out_features == 16
    # the default targets (every linear layer): only down_proj is feed-forward
    model = wrap_peft(load_base_model(path), Config.from_run_config(
        {"model": path, "peft-method": "ia3"}))
    assert {n.rsplit(".", 1)[-1] for n, m in _ia3_layers(model).items()
            if m.is_feedforward} == {"down_proj"}


@pytest.mark.parametrize("arch", ARCHITECTURES + MORE_ARCHITECTURES)
def test_ia3_feedforward_is_the_mlp_down_projection(tmp_path, arch):
    """Feed-forward = the MLP's down projection, on every family; the structural rule (used
    when peft has no table for the model type) agrees with peft's table where it has one."""
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_FF

    from fatellm_flwr.models import _down_projections, _ia3_feedforward, _linear_types

    base = load_base_model(str(build_tiny_model(arch, tmp_path / arch, num_layers=2)))
    targets = find_target_modules(base)
    instances = {n: m for n, m in base.named_modules()
                 if n.rsplit(".", 1)[-1] in targets and isinstance(m, _linear_types())}
    structural = _down_projections(base, instances)
    assert len(structural) == 2  # one per block
    assert all(n.rsplit(".", 2)[-2] in ("mlp", "ffn") or arch == "opt" for n in structural)
    known = PEFT_FF.get(base.config.model_type)
    if known is not None:
        assert structural == {n for n in instances if any(n.endswith(k) for k in known)}
    ff = _ia3_feedforward(base, targets)
    model = wrap_peft(base, Config.from_run_config(
        {"model": "unused", "peft-method": "ia3"}))
    flagged = {n for n, m in _ia3_layers(model).items() if m.is_feedforward}
    assert flagged == structural, ff
    assert len(_ia3_layers(model)) == len(instances)  # every target adapted once


def test_unknown_model_offline_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="could not load model 'no-such-org/no-such-model'"):
        load_base_model("no-such-org/no-such-model")


def test_broken_local_folder_says_what_is_broken(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), folder)
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 32,')
    for load in (load_base_model, load_tokenizer):
        with pytest.raises(ModelLoadError) as err:
            load(str(folder))
        msg = str(err.value)
        assert f"local folder {str(folder)!r} exists but its config.json is broken" in msg
        assert "JSONDecodeError" in msg and "line 1 column" in msg
        assert "not a local folder" not in msg and "Hub is offline" not in msg
    (folder / "config.json").write_text('{"model_type": "no-such-family"}')
    with pytest.raises(ModelLoadError, match="exists but transformers could not load it"):
        load_base_model(str(folder))
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"exists but it has no config.json \(files: .*"
                                             r"model.safetensors"):
        load_base_model(str(folder))


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


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_peft_last_layers_adapts_only_the_last_blocks(tiny_model_dir, arch):
    from fatellm_flwr.emulator import blocks_prefix, decoder_blocks

    path = str(tiny_model_dir(arch))
    full = wrap_peft(load_base_model(path), Config(model=path))
    last = wrap_peft(load_base_model(path), Config(model=path, peft_last_layers=1))
    depth, prefix = len(decoder_blocks(last)), blocks_prefix(last)
    names = trainable_names(last)
    assert names and all(f"{prefix}.{depth - 1}." in n for n in names), names
    assert len(names) * depth == len(trainable_names(full))
    # the blocks below the adapters run without autograd: nothing there needs a gradient
    tok = load_tokenizer(path)
    seen = []
    hook = decoder_blocks(last)[0].register_forward_hook(
        lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).requires_grad))
    last.train()
    last(**_batch(tok)).loss.backward()
    hook.remove()
    assert seen == [False]


def test_peft_last_layers_out_of_range_is_named(tiny_model_dir):
    from fatellm_flwr.config import ConfigError

    path = str(tiny_model_dir("llama"))
    depth = load_base_model(path).config.num_hidden_layers
    with pytest.raises(ValueError, match=rf"peft-last-layers={depth + 1} exceeds the {depth} "
                                         rf"decoder blocks.*0 \(all\) to {depth}"):
        wrap_peft(load_base_model(path), Config(model=path, peft_last_layers=depth + 1))
    for method in ("ia3", "prompt-tuning"):
        with pytest.raises(ConfigError, match=f"peft-last-layers=2 applies to peft-method "
                                              f"'lora' only, not '{method}'"):
            Config.from_run_config({"peft-method": method, "peft-last-layers": 2})
    for algorithm in ("offsite", "fedkseed"):
        with pytest.raises(ConfigError, match=f"peft-last-layers=2 does not apply to "
                                              f"algorithm='{algorithm}'"):
            Config.from_run_config({"algorithm": algorithm, "peft-last-layers": 2})

"""The `device` key and its plumbing: models, batches, evaluation, generation, DP, FedKSeed.

On a CPU-only machine the CUDA tests skip (with the reason); the routing itself is checked
with a probe model that records where its inputs arrive.
"""

from __future__ import annotations

from types import SimpleNamespace

import datasets
import pytest
import torch
from torch import nn

from fatellm_flwr.config import Config, ConfigError
from fatellm_flwr.device import (
    DeviceError,
    check_device_spec,
    model_device,
    node_device,
    resolve_device,
    to_device,
)

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none on this machine)")


# ----------------------------------------------------------------------------- resolving
def test_auto_and_cpu_resolve_on_this_machine():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if HAS_CUDA else "mps" if torch.backends.mps.is_available()
                         else "cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "CUDA", "cuda:0:1", "", "tpu"])
def test_malformed_specs_are_refused(spec):
    with pytest.raises(ValueError, match="allowed: auto, cpu, cuda, cuda:N"):
        check_device_spec(spec)
    with pytest.raises(ConfigError, match=rf"'device' has value {spec!r}; allowed: auto, cpu"):
        Config.from_run_config({"device": spec})


@pytest.mark.parametrize("spec", ["auto", "cpu", "cuda", "cuda:0", "cuda:7", "mps"])
def test_well_formed_specs_pass_config_validation(spec):
    # no hardware check here: the server machine may lack the clients' GPUs
    assert Config.from_run_config({"device": spec}).device == spec


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA: the missing-GPU error can't occur")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_missing_cuda_is_a_clear_error(spec):
    with pytest.raises(DeviceError, match=rf"device={spec!r} but .*use device='cpu' or 'auto'"):
        resolve_device(spec)


@needs_cuda
def test_cuda_index_beyond_the_gpus_is_refused():
    n = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=f"has {n} CUDA GPU"):
        resolve_device(f"cuda:{n}")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_missing_mps_is_a_clear_error():
    with pytest.raises(DeviceError, match="no usable Apple MPS"):
        resolve_device("mps")


def test_node_config_overrides_the_run_config_device():
    assert node_device("auto", {"device": "cpu"}) == "cpu"
    assert node_device("cuda", {}) == "cuda"
    assert node_device("cuda", {"device": ""}) == "cuda"
    with pytest.raises(DeviceError, match="node config: device 'gpu0'"):
        node_device("auto", {"device": "gpu0"})


# ----------------------------------------------------------------------------- routing
class ProbeLM(nn.Module):
    """A stand-in causal LM whose weights 'live' on ``device`` (meta: no memory, so the
    CPU-only machine can still tell "moved" from "left on the CPU") and which records the
    device of every tensor it is called with."""

    def __init__(self, device: str = "meta", vocab: int = 11):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, device=device))
        self.vocab = vocab
        self.seen: list[str] = []

    def forward(self, input_ids, attention_mask=None, labels=None):
        self.seen += [t.device.type for t in (input_ids, attention_mask, labels)
                      if t is not None]
        b, n = input_ids.shape
        # outputs on the CPU (meta tensors hold no values): only the inputs are probed
        return SimpleNamespace(logits=torch.zeros(b, n, self.vocab), loss=torch.tensor(1.0))

    def generate(self, input_ids, attention_mask=None, **_):
        self.seen += [input_ids.device.type, attention_mask.device.type]
        b, n = input_ids.shape
        return torch.ones(b, n + 1, dtype=torch.long)


def _tokenized(n=3):
    rows = [{"input_ids": [1, 2, 3, 4], "attention_mask": [1] * 4, "labels": [-100, -100, 3, 4]}
            for _ in range(n)]
    return datasets.Dataset.from_list(rows)


def test_batches_follow_the_model_to_its_device():
    from fatellm_flwr.metrics import (
        _next_token_logprobs,
        _sequence_logprob,
        generate,
    )
    from fatellm_flwr.testing import build_tiny_tokenizer
    from fatellm_flwr.train import causal_lm_loss, evaluate_loss

    tok = build_tiny_tokenizer()
    tok.pad_token = tok.pad_token or tok.eos_token
    model = ProbeLM()
    assert model_device(model).type == "meta"
    causal_lm_loss(model, {"input_ids": torch.ones(2, 3, dtype=torch.long),
                           "labels": torch.ones(2, 3, dtype=torch.long)})
    evaluate_loss(model, _tokenized(), batch_size=2, pad_id=0)
    assert _next_token_logprobs(model, tok, ["a b", "c"]).device.type == "cpu"
    assert _sequence_logprob(model, tok, "a b", [[3], [4, 5]]).device.type == "cpu"
    generate(model, tok, ["a b", "c"], max_new_tokens=1)
    assert model.seen and set(model.seen) == {"meta"}, model.seen


def test_to_device_moves_tensors_only():
    out = to_device({"a": torch.ones(2), "b": "text", "c": 3}, "meta")
    assert out["a"].device.type == "meta" and out["b"] == "text" and out["c"] == 3


# ----------------------------------------------------------------------------- models
def test_models_load_on_the_configured_device(tiny_model_dir):
    from fatellm_flwr.models import load_base_model, load_peft_model

    model = load_base_model(str(tiny_model_dir("llama")), device="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    peft_model, _ = load_peft_model(Config(model=str(tiny_model_dir("llama")), device="cpu"))
    assert {p.device.type for p in peft_model.parameters()} == {"cpu"}


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_loading_onto_a_missing_gpu_fails_before_reading_weights(tiny_model_dir):
    from fatellm_flwr.models import load_base_model

    with pytest.raises(DeviceError, match="device='cuda'"):
        load_base_model(str(tiny_model_dir("llama")), device="cuda")


def test_gradient_checkpointing_same_gradients(tiny_model_dir):
    """peft/transformers' checkpointing recomputes activations: same LoRA gradients."""
    from fatellm_flwr.models import load_base_model, wrap_peft

    path = str(tiny_model_dir("llama"))
    ids = torch.randint(3, 200, (2, 12))
    grads = {}
    for ckpt in (False, True):
        cfg = Config(model=path, lora_dropout=0.0, gradient_checkpointing=ckpt, device="cpu")
        torch.manual_seed(0)
        model = wrap_peft(load_base_model(path), cfg)
        for n, p in model.named_parameters():  # non-zero B so A gets a gradient too
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        model.train()
        inner = model.base_model.model
        assert inner.is_activation_checkpointing is ckpt  # transformers' own flag
        model(input_ids=ids, labels=ids).loss.backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for n in grads[True]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- on a GPU
def node_context(strategy, cid: str):
    """A node's Flower context holding the records the strategy queued for it (offsite's
    frozen emulator travels once, outside Parameters)."""
    from flwr.app import ArrayRecord, Context, RecordDict

    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    for name, rec in strategy.outbox.take(str(cid)).items():
        target = ctx.state.array_records if isinstance(rec, ArrayRecord) else \
            ctx.state.config_records
        target[name] = rec
    return ctx


DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.mark.parametrize("device", DEVICES)
def test_homo_training_and_eval_on_device(device, tiny_model_dir, tiny_classification_file):
    from fatellm_flwr.clients.homo import HomoClient
    from fatellm_flwr.models import clear_model_cache, get_trainable_state

    clear_model_cache()
    cfg = Config(model=str(tiny_model_dir("llama")), dataset=str(tiny_classification_file),
                 device=device, local_steps=2, max_length=48, test_size=10,
                 fraction_evaluate=1.0, partitioner="iid")
    client = HomoClient(cfg, 0, 2)
    assert model_device(client.model).type == device
    arrays, n, metrics = client.fit(get_trainable_state(client.model), {"server-round": 1})
    assert n > 0 and torch.isfinite(torch.tensor(metrics["train_loss"]))
    loss, _, _ = client.evaluate(arrays, {})
    assert loss == loss  # not NaN
    clear_model_cache()


@pytest.mark.parametrize("device", DEVICES)
def test_dp_sgd_on_device(device, tiny_model_dir, tiny_classification_file):
    from fatellm_flwr.clients.homo import HomoClient
    from fatellm_flwr.models import clear_model_cache, get_trainable_state

    clear_model_cache()
    cfg = Config(model=str(tiny_model_dir("llama")), dataset=str(tiny_classification_file),
                 device=device, local_steps=2, max_length=48, test_size=10, dp_sgd=True,
                 dp_noise_multiplier=1.0, lora_dropout=0.0, partitioner="iid")
    client = HomoClient(cfg, 0, 2)
    _, _, metrics = client.fit(get_trainable_state(client.model), {"server-round": 1})
    assert metrics["dp_epsilon"] > 0
    clear_model_cache()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algorithm", ["fedkseed", "offsite"])
def test_fedkseed_and_offsite_clients_train_on_device(algorithm, device, tiny_model_dir,
                                                      tiny_classification_file, tmp_path):
    """The server strategy (on the CPU) builds round 1's message; the client trains on CUDA."""
    import numpy as np
    from flwr.common import parameters_to_ndarrays

    from fatellm_flwr.algorithms import get_algorithm
    from fatellm_flwr.outputs import RunDir
    from fatellm_flwr.testing import FakeClientManager

    extra = {"fedkseed": {"zo_num_seeds": 64},
             "offsite": {"offsite_bottom": 1, "offsite_top": 1, "offsite_emulator_layers": 1}}
    cfg = Config(model=str(tiny_model_dir("llama")), dataset=str(tiny_classification_file),
                 algorithm=algorithm, device=device, local_steps=2, max_length=48,
                 test_size=10, partitioner="iid", server_eval=False, plots=False,
                 **extra[algorithm])
    algo = get_algorithm(cfg)
    strategy = algo.strategy_class()(cfg.replace(device="cpu"),
                                     RunDir.create(tmp_path, "run", algorithm))
    cm = FakeClientManager(2)
    proxy, ins = strategy.configure_fit(1, strategy.initialize_parameters(cm), cm)[0]
    ctx = node_context(strategy, proxy.cid)  # what node_records_mod does on a real node
    arrays, n, _ = algo.client_class()(cfg, 0, 2, context=ctx).fit(
        parameters_to_ndarrays(ins.parameters), ins.config)
    assert n > 0 and all(np.all(np.isfinite(a)) for a in arrays)

"""FedIPR core: secrets, the hinge regulariser, detection and verification of saved models,
plus the client glue (secret in context.state, DP-SGD post-processing step), for norm-scale
and LoRA-product carriers."""

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from fatellm_flwr.clients.fedipr import node_secret
from fatellm_flwr.clients.homo import HomoClient
from fatellm_flwr.config import Config
from fatellm_flwr.models import load_peft_model, save_adapter, set_trainable_state
from fatellm_flwr.privacy import fedipr as F


def _cfg(model, data, **kw):
    return Config.from_run_config({
        "model": str(model), "dataset": str(data), "test-size": 12, "max-examples": 0,
        "local-steps": 4, "lr": 5e-3, "max-length": 48, "partitioner": "iid",
        "lora-dropout": 0.0, "fedipr": True, "fedipr-bits": 16, **kw})


def test_secret_is_derived_from_an_os_random_key():
    a = F.generate_secret(["x.weight", "y.weight"], [8, 4], bits=10)
    b = F.generate_secret(["x.weight", "y.weight"], [8, 4], bits=10)
    assert a.key != b.key  # fresh OS randomness, not a run-config seed
    again = F.Secret.from_json(a.to_json())
    assert torch.equal(again.signature, a.signature)
    assert torch.equal(again.projection, a.projection)
    assert set(a.signature.tolist()) <= {-1.0, 1.0}
    # rows have unit norm and sum to 0 within each carrier tensor
    assert torch.allclose(a.projection.norm(dim=1), torch.ones(10), atol=1e-5)
    assert torch.allclose(a.projection[:, :8].sum(1), torch.zeros(10), atol=1e-5)
    assert torch.allclose(a.projection[:, 8:].sum(1), torch.zeros(10), atol=1e-5)


def test_hinge_embeds_the_signature_and_random_secrets_stay_at_chance():
    torch.manual_seed(0)
    gamma = (1 + 0.1 * torch.randn(256)).requires_grad_(True)
    secret = F.generate_secret(["w"], [256], bits=64, key=1)
    assert F.hinge_loss(gamma, secret, margin=0.05) > 0
    opt = torch.optim.Adam([gamma], lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        F.hinge_loss(gamma, secret, margin=0.05).backward()
        opt.step()
    assert F.detection_rate(gamma.detach(), secret) == 1.0
    assert F.hinge_loss(gamma, secret, margin=0.05).item() == 0.0
    # secrets the vector never saw: each bit matches with probability 1/2
    rates = [F.detection_rate(gamma.detach(), F.generate_secret(["w"], [256], 64, key=k))
             for k in range(2, 42)]
    assert abs(np.mean(rates) - 0.5) < 0.05
    # a common scale of a norm layer carries nothing: centred projection rows
    assert F.detection_rate(torch.ones(256), secret) < 1.0
    assert F.binomial_tail(64, 64) == pytest.approx(2.0 ** -64)
    assert F.binomial_tail(0, 64) == pytest.approx(1.0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_carriers_are_norm_scales_of_the_last_blocks(tiny_model_dir, tiny_classification_file,
                                                     arch):
    cfg = _cfg(tiny_model_dir(arch), tiny_classification_file, **{"fedipr-blocks": 1})
    model, _ = load_peft_model(cfg)
    secret = F.secret_for_model(model, blocks=1, bits=16)
    expected = {"llama": ["model.layers.3.input_layernorm.weight",
                          "model.layers.3.post_attention_layernorm.weight"],
                "gpt2": ["transformer.h.3.ln_1.weight", "transformer.h.3.ln_2.weight"]}[arch]
    assert list(secret.carriers) == expected
    params = F.carrier_parameters(model, secret.carriers)
    assert all(p.requires_grad for p in params)  # trainable copies (modules_to_save)
    with pytest.raises(ValueError, match="fedipr-blocks=9"):
        F.block_norm_names(model.get_base_model(), 9)


def test_client_embeds_its_secret_and_verifies_a_saved_adapter(
        tiny_model_dir, tiny_classification_file, tmp_path):
    cfg = _cfg(tiny_model_dir("llama"), tiny_classification_file,
               **{"fedipr-secret-dir": str(tmp_path / "keys")})
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    client = HomoClient(cfg, partition_id=0, num_partitions=2, context=ctx)
    params = client.get_parameters({})
    for rnd in (1, 2, 3):
        params, _, metrics = client.fit(params, {"server-round": rnd})
    assert metrics["fedipr_detection_local"] == 1.0
    assert metrics["fedipr_detection_local_p0"] == 1.0
    assert "fedipr_detection_global" in metrics
    # the secret lives in the node's state: a fresh client object (a new ClientApp process)
    # with the same context uses the same one
    secret = node_secret(cfg, client.model, ctx, 0)
    fresh = HomoClient(cfg, partition_id=0, num_partitions=2, context=ctx)
    assert node_secret(cfg, fresh.model, ctx, 0).key == secret.key
    assert (tmp_path / "keys" / "fedipr-secret-0.json").exists()
    # a saved adapter proves ownership; a never-seen secret does not
    set_trainable_state(client.model, params)
    out = save_adapter(client.model, tmp_path / "adapter")
    v = F.verify(out, F.Secret.load(tmp_path / "keys" / "fedipr-secret-0.json"))
    assert v.owner and v.detection == 1.0 and v.p_value < 1e-4
    assert F.main([str(out), str(tmp_path / "keys" / "fedipr-secret-0.json")]) == 0
    other = F.secret_for_model(client.model, cfg.fedipr_blocks, 16)
    assert not F.verify(out, other).owner


@pytest.mark.parametrize("carriers", ["norm", "lora"])
def test_dp_sgd_keeps_the_watermark_as_post_processing(tiny_model_dir,
                                                       tiny_classification_file, carriers):
    cfg = _cfg(tiny_model_dir("llama"), tiny_classification_file,
               **{"dp-sgd": True, "dp-noise-multiplier": 1.0, "num-server-rounds": 3,
                  "fedipr-carriers": carriers})
    client = HomoClient(cfg, partition_id=1, num_partitions=2)
    params = client.get_parameters({})
    for rnd in (1, 2, 3):
        params, _, metrics = client.fit(params, {"server-round": rnd})
    assert metrics["dp_epsilon"] > 0
    assert metrics["fedipr_detection_local"] >= 0.9


@pytest.mark.parametrize("extra, match", [
    ({"algorithm": "offsite"}, "fedipr=true needs algorithm='homo'"),
    ({"peft-method": "prefix-tuning"}, "fedipr=true needs peft-method"),
    ({"fedipr-bits": 0}, "'fedipr-bits' has value 0"),
    ({"fedipr-lr": -1.0}, "'fedipr-lr' has value -1.0"),
    ({"fedipr-carriers": "bias"}, "'fedipr-carriers' has value 'bias'.*norm, lora"),
    ({"fedipr-carriers": "lora", "peft-method": "ia3"},
     "'fedipr-carriers' has value 'lora', which needs peft-method='lora'.*'ia3'"),
])
def test_bad_fedipr_settings_are_refused(extra, match):
    from fatellm_flwr.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        Config.from_run_config({"fedipr": True, **extra})


# --------------------------------------------------------------------------- LoRA carriers
def test_lora_rows_are_unit_rank_one_sums_never_materialised():
    """``(E dW)_j = sum_m u_jm^T B_m A_m v_jm`` equals the dense projection with rows
    ``sum_m u_jm v_jm^T`` of unit Frobenius norm; only ``bits x (d_out + d_in)`` is stored."""
    shapes = [(6, 5), (4, 7)]
    secret = F.generate_secret(["m.q", "m.v"], shapes, bits=12, key=3, kind="lora")
    assert secret.projection.shape == (12, 6 + 5 + 4 + 7)
    again = F.Secret.from_json(secret.to_json())
    assert again.kind == "lora" and again.sizes == ((6, 5), (4, 7))
    assert torch.equal(again.projection, secret.projection)
    assert len(secret.to_json()) < 300
    torch.manual_seed(0)
    factors = [(torch.randn(3, d_in), torch.randn(d_out, 3)) for d_out, d_in in shapes]
    dense, row_norm2, start = torch.zeros(12), torch.zeros(12), 0
    for (a, b), (d_out, d_in) in zip(factors, shapes):
        u = secret.projection[:, start:start + d_out]
        v = secret.projection[:, start + d_out:start + d_out + d_in]
        rows = torch.einsum("jo,ji->joi", u, v)
        dense += (rows * (b @ a)).sum((1, 2))
        row_norm2 += (rows ** 2).sum((1, 2))
        start += d_out + d_in
    assert torch.allclose(F.projected(factors, secret), dense, atol=1e-5)
    assert torch.allclose(row_norm2, torch.ones(12), atol=1e-5)  # margin in units of B A
    # an untrained LoRA (B = 0) projects to exactly 0: every bit counts half
    zero_b = [(a, torch.zeros_like(b)) for a, b in factors]
    assert F.detection_rate(zero_b, secret) == 0.5
    with pytest.raises(ValueError, match="the secret expects B A of 6x5"):
        F.projected([(torch.randn(3, 4), torch.randn(6, 3)), factors[1]], secret)


def test_lora_carriers_embed_verify_from_the_adapter_and_stay_at_chance(
        tiny_model_dir, tiny_classification_file, tmp_path):
    cfg = _cfg(tiny_model_dir("llama"), tiny_classification_file,
               **{"fedipr-carriers": "lora", "fedipr-secret-dir": str(tmp_path / "keys")})
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    client = HomoClient(cfg, partition_id=0, num_partitions=2, context=ctx)
    trainable = [n for n, p in client.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    params = client.get_parameters({})  # nothing but the adapter travels
    for rnd in (1, 2, 3):
        params, _, metrics = client.fit(params, {"server-round": rnd})
    secret = node_secret(cfg, client.model, ctx, 0)
    assert secret.kind == "lora"
    assert secret.carriers[0] == "model.layers.2.self_attn.q_proj"  # last 2 of 4 blocks
    assert len(secret.carriers) == 14 and secret.sizes[0] == (32, 32)
    assert metrics["fedipr_detection_local"] >= 0.9
    live = F.model_detection_rate(client.model, secret)
    assert live == metrics["fedipr_detection_local"]
    # fresh secrets on the same model: each bit matches with probability 1/2
    factors = F.carrier_values(client.model, secret)
    rates = [F.detection_rate(factors, secret.fresh()) for _ in range(200)]
    assert abs(np.mean(rates) - 0.5) < 0.05  # std of the mean over 3200 bits: 0.009
    # the saved adapter (lora_A / lora_B only) proves ownership, at the live rate
    out = save_adapter(client.model, tmp_path / "adapter")
    key_file = tmp_path / "keys" / "fedipr-secret-0.json"
    v = F.verify(out, F.Secret.load(key_file))
    assert v.detection == live and v.owner and v.p_value < 1e-3
    assert F.verify(out / "adapter_model.safetensors", secret).detection == live
    assert F.main([str(out), str(key_file)]) == 0
    assert np.mean([F.verify(out, secret.fresh()).detection for _ in range(20)]) < 0.75
    # a secret stored for one carrier kind is not silently reused with the other
    with pytest.raises(ValueError, match="fedipr-carriers=norm"):
        node_secret(cfg.replace(fedipr_carriers="norm"), client.model, ctx, 0)


def test_lora_carriers_survive_fedavg_of_the_factors(tiny_model_dir, tiny_classification_file):
    """FedAvg averages A and B, not B A: every client's signature still shows in the global
    adapter of a 3-client federation (FedAvg by hand, no Flower)."""
    cfg = _cfg(tiny_model_dir("llama"), tiny_classification_file,
               **{"fedipr-carriers": "lora", "local-steps": 3, "batch-size": 4})
    ctxs = [Context(run_id=1, node_id=p, node_config={}, state=RecordDict(), run_config={})
            for p in range(3)]
    clients = [HomoClient(cfg, partition_id=p, num_partitions=3, context=ctxs[p])
               for p in range(3)]
    glob = clients[0].get_parameters({})
    for rnd in (1, 2, 3):
        fits = [c.fit(glob, {"server-round": rnd}) for c in clients]
        total = sum(n for _, n, _ in fits)
        glob = [sum(arrays[i] * n for arrays, n, _ in fits) / total for i in range(len(glob))]
    set_trainable_state(clients[0].model, glob)
    secrets = [node_secret(cfg, clients[0].model, ctxs[p], p) for p in range(3)]
    assert len({s.key for s in secrets}) == 3
    rates = [F.model_detection_rate(clients[0].model, s) for s in secrets]
    assert min(rates) >= 0.8, rates  # 1.0 for all three in 10 of 10 tries


@pytest.fixture(scope="module")
def tiny_olmo_dir(tmp_path_factory):
    """A tiny OLMo: its LayerNorms have no weight (``elementwise_affine=False``)."""
    import transformers

    from fatellm_flwr.testing import build_tiny_tokenizer

    out = tmp_path_factory.mktemp("tiny-olmo")
    tok = build_tiny_tokenizer()
    config = transformers.OlmoConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, eos_token_id=1, bos_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_model_without_norm_scales_needs_lora_carriers(tiny_olmo_dir,
                                                       tiny_classification_file):
    cfg = _cfg(tiny_olmo_dir, tiny_classification_file)
    with pytest.raises(ValueError, match="no trainable scale; set fedipr-carriers=lora"):
        load_peft_model(cfg)
    ctx = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})
    client = HomoClient(cfg.replace(fedipr_carriers="lora"), partition_id=0, num_partitions=2,
                        context=ctx)
    params, _, metrics = client.fit(client.get_parameters({}), {"server-round": 1})
    assert metrics["fedipr_detection_global"] == 0.5  # untrained LoRA: B = 0
    assert metrics["fedipr_detection_local"] >= 0.9  # 1.0 in 15 of 15 tries (4 steps)

"""FedIPR core: secrets, the hinge regulariser, detection and verification of saved models,
plus the client glue (secret in context.state, DP-SGD post-processing step)."""

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


def test_dp_sgd_keeps_the_watermark_as_post_processing(tiny_model_dir,
                                                       tiny_classification_file):
    cfg = _cfg(tiny_model_dir("llama"), tiny_classification_file,
               **{"dp-sgd": True, "dp-noise-multiplier": 1.0, "num-server-rounds": 3})
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
])
def test_bad_fedipr_settings_are_refused(extra, match):
    from fatellm_flwr.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        Config.from_run_config({"fedipr": True, **extra})

"""DP-SGD core (fatellm_flwr.privacy.dp): clipping, noise, accounting, budget, models."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import AutoModelForCausalLM

from fatellm_flwr.privacy import dp

LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


class TokenDataset(Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


def _ids(n: int, seq: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 250, (n, seq), generator=torch.Generator().manual_seed(seed))


def _loader(ids: torch.Tensor, batch_size: int, seed: int = 0) -> DataLoader:
    return DataLoader(
        TokenDataset(ids), batch_size=batch_size, generator=torch.Generator().manual_seed(seed)
    )


def _lora(path, arch: str = "llama") -> nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path)
    # init_lora_weights=False: B is random too, so every LoRA tensor has a non-zero gradient
    cfg = LoraConfig(
        r=4, target_modules=LORA_TARGETS[arch], lora_dropout=0.0, init_lora_weights=False
    )
    return get_peft_model(model, cfg)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _attach(model, ids, batch_size, lr: float = 1.0, **kw) -> dp.DPSession:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    kw.setdefault("delta", 1e-5)
    return dp.attach_dp_sgd(model, opt, _loader(ids, batch_size), **kw)


# --------------------------------------------------------------------------- loss


def test_per_sequence_loss_matches_hf_per_row_and_ignores_other_rows(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    ids = _ids(3, 8)
    labels = ids.clone()
    labels[1, 5:] = dp.IGNORE_INDEX  # row 1 has a shorter target
    labels[2, :] = dp.IGNORE_INDEX  # row 2 has none
    with torch.no_grad():
        losses = dp.per_sequence_lm_loss(model(input_ids=ids).logits, labels)
        for i in range(2):
            hf = model(input_ids=ids[i : i + 1], labels=labels[i : i + 1]).loss
            assert losses[i].item() == pytest.approx(hf.item(), rel=1e-5)
    assert losses.shape == (3,)
    assert losses[2].item() == 0.0


# --------------------------------------------------------------------------- clipping, noise


def test_dp_step_clips_each_per_sample_gradient(tiny_model_dir):
    """Noise 0, tiny bound: the update equals sum_i clip(g_i)/B, g_i computed one row at a time."""
    model = _lora(tiny_model_dir("llama"))
    reference = copy.deepcopy(model)
    ids = _ids(8)
    bound = 1e-3
    # lr 1e4 keeps the float32 parameter difference well above rounding
    session = _attach(model, ids, 4, lr=1e4, noise_multiplier=0.0, max_grad_norm=bound)
    assert session.sample_rate == 0.5 and session.optimizer.expected_batch_size == 4
    before = _trainable(model)
    batch = {"input_ids": ids[:4], "attention_mask": torch.ones_like(ids[:4])}
    session.step(batch)

    names = list(before)
    params = dict(reference.named_parameters())
    expected = torch.zeros_like(_flat(before.values()))
    for i in range(4):
        reference.zero_grad()
        loss = dp.per_sequence_lm_loss(reference(input_ids=ids[i : i + 1]).logits, ids[i : i + 1])
        loss.sum().backward()
        g = _flat(params[n].grad for n in names)
        assert g.norm() > 10 * bound  # clipping is active for every record
        expected += g * min(1.0, bound / (g.norm().item() + 1e-6))
    expected /= 4
    update = (_flat(before.values()) - _flat(_trainable(model).values())) / 1e4
    torch.testing.assert_close(update, expected, rtol=1e-3, atol=1e-8)
    # each record contributes at most `bound`, so the mean update has norm <= bound
    assert update.norm().item() <= bound * (1 + 1e-3)


def test_noise_only_step_on_empty_batch_has_std_noise_times_bound(tiny_model_dir):
    model = _lora(tiny_model_dir("llama"))
    sigma, bound = 2.0, 0.5
    session = _attach(
        model, _ids(8), batch_size=4, noise_multiplier=sigma, max_grad_norm=bound,
        noise_generator=torch.Generator().manual_seed(1),
    )
    draws = []
    for _ in range(3):
        before = _flat(_trainable(model).values())
        empty = {"input_ids": torch.zeros((0, 10), dtype=torch.long)}
        assert dp.is_empty_batch(empty) and session.step(empty) is None
        # SGD lr=1: update = -(0 + N(0, (sigma*bound)^2)) / expected_batch_size
        draws.append((before - _flat(_trainable(model).values())) * 4)
    noise = torch.cat(draws)
    assert noise.numel() > 5000
    assert noise.std().item() == pytest.approx(sigma * bound, rel=0.05)
    assert abs(noise.mean().item()) < 0.05 * sigma * bound
    assert session.history_entry() == (sigma, 0.5, 3)  # empty batches are accounted steps


def _noise_and_batches(model_path, **generators) -> tuple[torch.Tensor, list]:
    """One pass of Poisson batches (their rows) and the noise of one noise-only step, after
    resetting torch's global seed as a client does from the shared run-config ``seed``."""
    model = _lora(model_path)
    torch.manual_seed(0)
    session = _attach(model, _ids(16), batch_size=4, noise_multiplier=1.0, max_grad_norm=1.0,
                      **generators)
    batches = [[] if dp.is_empty_batch(b) else b["input_ids"].tolist()
               for b in session.batches()]
    before = _flat(_trainable(model).values())
    session.step({"input_ids": torch.zeros((0, 10), dtype=torch.long)})
    return before - _flat(_trainable(model).values()), batches


def test_noise_and_poisson_batches_are_unpredictable_by_default(tiny_model_dir):
    """Same model, data, loader seed and global seed: the noise and the sampled batches still
    differ (OS-random generators), so nobody who knows the run config can regenerate them."""
    noise_a, batches_a = _noise_and_batches(tiny_model_dir("llama"))
    noise_b, batches_b = _noise_and_batches(tiny_model_dir("llama"))
    assert noise_a.abs().sum() > 0 and noise_b.abs().sum() > 0
    assert not torch.equal(noise_a, noise_b)
    assert batches_a != batches_b  # 4 batches over 16 records: equal with prob. ~2^-64
    # explicit generators (dp-reproducible-noise): identical runs
    seeded = [_noise_and_batches(tiny_model_dir("llama"),
                                 noise_generator=torch.Generator().manual_seed(7),
                                 sampler_generator=torch.Generator().manual_seed(8))
              for _ in range(2)]
    assert torch.equal(seeded[0][0], seeded[1][0]) and seeded[0][1] == seeded[1][1]
    assert not torch.equal(seeded[0][0], noise_a)


def test_empty_first_poisson_batch_is_a_noise_only_step(tiny_model_dir):
    """Random sampling makes an empty *first* batch possible (probability (1 - q)^N, ~2% for
    a 49-record client): Opacus then built zeros per field of the dict record and crashed
    (torch.zeros(dtype=str)); it must be a zero-length batch of the usual structure."""
    model = _lora(tiny_model_dir("llama"))
    session = _attach(model, _ids(8), batch_size=4, noise_multiplier=1.0, max_grad_norm=1.0)
    empty = session.data_loader.collate_fn([])  # what the loader yields for an empty draw
    assert dp.is_empty_batch(empty) and set(empty) == {"input_ids", "attention_mask"}
    assert empty["input_ids"].shape == (0, 10) and empty["input_ids"].dtype == torch.long
    before = _flat(_trainable(model).values())
    assert session.step(empty) is None and session.steps == 1
    assert not torch.equal(before, _flat(_trainable(model).values()))  # noise was added


def test_os_random_generators_differ_and_live_on_the_device():
    a, b = dp.os_random_generator(), dp.os_random_generator(torch.device("cpu"))
    assert a.device.type == "cpu" and a.initial_seed() != b.initial_seed()
    assert not torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_zero_noise_huge_clip_reproduces_non_dp_update(tiny_model_dir, arch):
    model = _lora(tiny_model_dir(arch), arch)
    reference = copy.deepcopy(model)
    ids = _ids(8)
    session = _attach(model, ids, batch_size=4, noise_multiplier=0.0, max_grad_norm=1e6)
    batch = {"input_ids": ids[:4], "attention_mask": torch.ones_like(ids[:4])}
    dp_loss = session.step(batch)

    opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=1.0)
    loss = dp.per_sequence_lm_loss(reference(input_ids=ids[:4]).logits, ids[:4]).mean()
    loss.backward()
    ref_grad = _flat(p.grad for p in reference.parameters() if p.requires_grad)
    opt.step()
    assert dp_loss == pytest.approx(loss.item(), rel=1e-6)
    assert ref_grad.norm() > 0
    dp_params, ref_params = _trainable(model), _trainable(reference)
    assert list(dp_params) == list(ref_params)
    for name, value in dp_params.items():
        torch.testing.assert_close(value, ref_params[name], rtol=1e-5, atol=1e-7)
    assert isinstance(session.close(), type(reference))


def test_dp_training_lowers_loss_on_tiny_task(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    # LoRA on lm_head too: the random 32-wide model's logits barely move with q/v alone
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], lora_dropout=0.0)
    model = get_peft_model(model, cfg)
    ids = _ids(1, 10, seed=3).repeat(32, 1)  # one sentence, 32 records
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    session = dp.attach_dp_sgd(  # seeded generators: a deterministic learning check
        model, opt, _loader(ids, 8), noise_multiplier=0.5, max_grad_norm=1.0, delta=1e-5,
        noise_generator=torch.Generator().manual_seed(0),
        sampler_generator=torch.Generator().manual_seed(1),
    )

    def eval_loss() -> float:
        with torch.no_grad():
            return dp.causal_lm_loss(session.model, {"input_ids": ids[:4]}).mean().item()

    start = eval_loss()
    for _ in range(6):
        for batch in session.batches():
            session.step(batch)
    assert session.steps == 24
    assert eval_loss() < start - 1.5  # measured 5.68 -> 1.54 (sigma 0.5, 24 steps)
    assert math.isfinite(session.epsilon()) and session.epsilon() > 0


# --------------------------------------------------------------------------- accounting


def test_epsilon_matches_independent_opacus_accountants(tiny_model_dir):
    model = _lora(tiny_model_dir("llama"))
    session = _attach(model, _ids(12), batch_size=3, noise_multiplier=1.1, max_grad_norm=1.0)
    steps = 0
    for batch in session.batches():
        session.step(batch)
        steps += 1
    assert session.sample_rate == 0.25 and session.history_entry() == (1.1, 0.25, steps)
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=1.1, sample_rate=0.25)
    assert session.epsilon() == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)

    # a restarted client: rounds stored as records give the same epsilon as one accountant
    rounds = [(1.1, 0.25, 4), (1.1, 0.25, 4), (0.8, 0.1, 7), (1.1, 0.25, 2)]
    for name, cls in (("rdp", RDPAccountant), ("prv", PRVAccountant)):
        acc = cls()
        for noise, q, k in rounds:
            for _ in range(k):
                acc.step(noise_multiplier=noise, sample_rate=q)
        got = dp.epsilon_from_history(rounds, 1e-5, name)
        assert got == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-6), name
    assert dp.merge_history(rounds) == [(1.1, 0.25, 10), (0.8, 0.1, 7)]
    assert dp.epsilon_from_history([], 1e-5) == 0.0
    assert dp.epsilon_from_history([(0.0, 0.1, 1)], 1e-5) == math.inf


def test_target_epsilon_sets_noise_and_default_budget(tiny_model_dir):
    model = _lora(tiny_model_dir("llama"))
    session = _attach(model, _ids(8), 2, target_epsilon=2.0, max_grad_norm=1.0, planned_steps=20)
    eps = dp.epsilon_from_history([(session.noise_multiplier, 0.25, 20)], 1e-5)
    assert 2.0 - 0.05 < eps <= 2.0
    assert session.max_epsilon == 2.0 and session.step_limit >= 20


def test_steps_until_budget_is_the_last_step_within_budget():
    history, nxt = [(1.0, 0.1, 50)], (1.0, 0.1)
    k = dp.steps_until_budget(history, nxt, 1e-5, 8.0)
    assert k > 0
    assert dp.epsilon_from_history([*history, (*nxt, k)], 1e-5) <= 8.0
    assert dp.epsilon_from_history([*history, (*nxt, k + 1)], 1e-5) > 8.0
    assert dp.steps_until_budget([(1.0, 0.1, 10**4)], nxt, 1e-5, 8.0) == 0
    assert dp.steps_until_budget([], (1e4, 0.01), 1e-5, 3.0, max_steps=1000) == 1000


def test_session_stops_at_max_epsilon_with_clear_message(tiny_model_dir):
    model = _lora(tiny_model_dir("llama"))
    prior = [(2.0, 0.5, 2)]
    limit = dp.steps_until_budget(prior, (2.0, 0.5), 1e-5, 4.0)
    assert 1 <= limit < 10
    session = _attach(
        model, _ids(8), 4, noise_multiplier=2.0, max_grad_norm=1.0, max_epsilon=4.0,
        prior_history=prior,
    )
    empty = {"input_ids": torch.zeros((0, 10), dtype=torch.long)}
    for _ in range(limit):
        session.step(empty)
    assert session.steps_left() == 0 and session.epsilon() <= 4.0
    with pytest.raises(dp.PrivacyBudgetExhausted, match=r"max_epsilon=4\.0"):
        session.step(empty)
    assert session.steps == limit
    assert session.history() == [(2.0, 0.5, 2 + limit)]


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_epsilon": 0.0, "planned_steps": 10}, r"target_epsilon=0\.0 .*> 0"),
        ({"target_epsilon": -1.0, "planned_steps": 10}, r"target_epsilon=-1\.0"),
        ({"noise_multiplier": 1.0, "delta": 1.0}, r"delta=1\.0 .*0 < delta < 1"),
        ({"noise_multiplier": 1.0, "delta": 0.0}, r"delta=0\.0"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, r"max_grad_norm=0\.0 .*> 0"),
        ({"noise_multiplier": -0.5}, r"noise_multiplier=-0\.5 .*>= 0"),
        ({"noise_multiplier": 1.0, "target_epsilon": 3.0, "planned_steps": 5}, "exactly one"),
        ({}, "exactly one"),
        ({"target_epsilon": 3.0}, "planned_steps is required"),
        ({"noise_multiplier": 1.0, "accountant": "gdp"}, r"accountant='gdp'.*rdp, prv"),
        ({"noise_multiplier": 1.0, "grad_sample_mode": "ew"}, r"grad_sample_mode='ew'"),
        (
            {"target_epsilon": 0.05, "planned_steps": 100},
            r"target_epsilon=0\.05 is unreachable.*at least 0\.10",
        ),
    ],
)
def test_bad_values_raise_clear_errors(tiny_model_dir, kwargs, message):
    model = _lora(tiny_model_dir("llama"))
    kwargs = {"max_grad_norm": 1.0, "delta": 1e-5, **kwargs}
    with pytest.raises(ValueError, match=message):
        _attach(model, _ids(8), 4, **kwargs)


def test_unsupported_trainable_modules_are_frozen_with_warning(caplog):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(self.lin(x))

    net = Net()
    with caplog.at_level(logging.WARNING, logger="fatellm_flwr.privacy.dp"):
        frozen = dp.freeze_unsupported_modules(net.train())
    assert frozen == ["bn"] and "bn" in caplog.text
    assert not net.bn.weight.requires_grad and net.lin.weight.requires_grad


def test_prompt_tuning_has_no_per_sample_gradients_and_is_refused(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match=r"no trainable parameters left.*prompt_encoder"):
        _attach(model, _ids(8), 4, noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.mark.parametrize("physical", [1, 3])
def test_physical_batches_give_the_logical_batch_update_and_one_accounting_step(
    tiny_model_dir, physical
):
    """Virtual batching: chunks of `physical` records, clipped per record and summed, give the
    same update as the whole batch at once (noise 0), and the accountant sees one step."""
    whole, chunked = _lora(tiny_model_dir("llama")), _lora(tiny_model_dir("llama"))
    ids = _ids(14)
    kw = dict(lr=1e4, noise_multiplier=0.0, max_grad_norm=1e-3)
    a = _attach(whole, ids, 7, **kw)
    b = _attach(chunked, ids, 7, physical_batch_size=physical, **kw)
    batch = {"input_ids": ids[:7], "attention_mask": torch.ones_like(ids[:7])}
    before = _flat(_trainable(whole).values())
    loss_a, loss_b = a.step(batch), b.step(batch)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    update_a = before - _flat(_trainable(whole).values())
    update_b = before - _flat(_trainable(chunked).values())
    assert update_a.norm() > 0
    torch.testing.assert_close(update_b, update_a, rtol=1e-4, atol=1e-6)
    assert a.steps == b.steps == 1
    assert b.history_entry() == a.history_entry()  # same (noise, sample rate, steps)
    # the next logical batch starts from a clean sum (no leftover chunk gradients)
    a.step(batch), b.step(batch)
    torch.testing.assert_close(_flat(_trainable(chunked).values()),
                               _flat(_trainable(whole).values()), rtol=1e-4, atol=1e-6)
    assert b.steps == 2


def test_physical_batch_noise_is_added_once_per_logical_batch(tiny_model_dir):
    """With a zero clip-sum (huge noise vs. a tiny bound) the update's spread is that of one
    noise draw over the logical batch: std = noise * bound / expected batch size."""
    model = _lora(tiny_model_dir("llama"))
    ids = _ids(16)
    session = _attach(model, ids, 8, lr=1.0, noise_multiplier=1.0, max_grad_norm=1e-6,
                      physical_batch_size=2)
    before = _flat(_trainable(model).values())
    session.step({"input_ids": ids[:8], "attention_mask": torch.ones_like(ids[:8])})
    update = before - _flat(_trainable(model).values())
    # 4 chunks noised separately would give 4x the variance (2x the std)
    assert update.std().item() == pytest.approx(1.0 * 1e-6 / 8, rel=0.1)

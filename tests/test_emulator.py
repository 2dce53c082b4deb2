"""Offsite-tuning core (fatellm_flwr.emulator) on tiny 8-layer models of every family."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from fatellm_flwr.emulator import (
    OffsiteSplit,
    adapter_parameter_names,
    adapter_state,
    blocks_prefix,
    build_emulator,
    client_payload,
    decoder_blocks,
    distill_emulator,
    emulator_from_payload,
    emulator_frozen_names,
    mark_adapters_trainable,
    merge_lora,
    per_layer_keys,
    plug_in,
    set_decoder_blocks,
)
from fatellm_flwr.testing import ARCHITECTURES, MORE_ARCHITECTURES, build_tiny_model

L = 8
ALL_ARCHITECTURES = ARCHITECTURES + MORE_ARCHITECTURES
UNTIED = {"llama", "gpt_neox", "phi", "gptj", "mistral", "stablelm"}  # own output head


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    """Factory: path of a saved tiny 8-layer model of ``arch`` (cached for the module)."""
    cache: dict[str, object] = {}

    def make(arch: str):
        if arch not in cache:
            cache[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(f"deep-{arch}"), L)
        return cache[arch]

    return make


def load(deep_dir, arch: str, scramble: bool = False):
    model = AutoModelForCausalLM.from_pretrained(deep_dir(arch)).eval()
    if scramble:  # every tensor distinct (norms start as all-ones), so value checks mean something
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def ids(batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 300, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, **kw).logits


def block_index(name: str, prefix: str) -> int | None:
    m = re.match(rf"{re.escape(prefix)}\.(\d+)\.", name)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------- split


def test_split_indices():
    s = OffsiteSplit(8, 2, 2, 2)
    assert s.middle_indices() == [2, 3, 4, 5]
    assert s.emulator_indices() == [2, 5]
    assert s.dropped_indices() == [3, 4]
    assert s.adapter_indices() == [0, 1, 6, 7]
    assert s.kept_indices() == [0, 1, 2, 5, 6, 7]
    assert s.emulator_adapter_positions() == [0, 1, 4, 5]
    assert [s.full_index(j) for j in range(s.emulator_size)] == [0, 1, 2, 5, 6, 7]
    assert OffsiteSplit(8, 2, 2, 3).emulator_indices() == [2, 4, 5]  # 1.5 rounds half up
    assert OffsiteSplit(8, 2, 2, 1).emulator_indices() == [3]
    assert OffsiteSplit(8, 2, 2, 0).emulator_indices() == []
    assert OffsiteSplit(8, 2, 2, 4).emulator_indices() == [2, 3, 4, 5]
    assert OffsiteSplit(8, 0, 0, 3).kept_indices() == [0, 4, 7]
    # OPT-1.3B-like: 24 layers, 2+2 adapters, 8-layer emulator (paper's setting)
    assert OffsiteSplit(24, 2, 2, 8).emulator_indices() == [2, 5, 7, 10, 13, 16, 18, 21]


def test_split_never_duplicates():
    for n_layers in range(1, 13):
        for a in range(n_layers):
            for b in range(n_layers - a):
                for n in range(n_layers - a - b + 1):
                    s = OffsiteSplit(n_layers, a, b, n)
                    em = s.emulator_indices()
                    assert len(em) == n and em == sorted(set(em))
                    assert set(em) <= set(s.middle_indices())
                    if n >= 2:
                        assert em[0] == a and em[-1] == n_layers - b - 1
                    kept = s.kept_indices()
                    assert kept == sorted(set(kept)) and len(kept) == a + n + b


@pytest.mark.parametrize(
    "args, pattern",
    [
        ((8, 4, 4, 0), r"bottom \+ top = 4 \+ 4 = 8 must be < num_layers = 8"),
        ((8, 5, 3, 1), r"bottom \+ top .* must be < num_layers"),
        ((8, 2, 2, 5), r"emulator_layers \(n\)=5 is out of range: allowed \[0, 4\]"),
        ((8, -1, 2, 1), r"bottom \(adapter blocks a\)=-1 is out of range: allowed \[0, 7\]"),
        ((8, 2, -1, 1), r"top \(adapter blocks b\)=-1 is out of range"),
        ((8, 2, 2, -1), r"emulator_layers \(n\)=-1 is out of range"),
        ((0, 0, 0, 0), r"num_layers=0 is out of range"),
        ((8, 2.0, 2, 1), r"bottom .* must be an int"),
        ((8, 2, 2, True), r"emulator_layers .* must be an int"),
    ],
)
def test_bad_splits(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        OffsiteSplit(*args)


def test_unknown_architecture_and_depth_mismatch(deep_dir):
    with pytest.raises(TypeError, match="Linear.*supported layouts.*model.layers"):
        decoder_blocks(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="has 8 decoder blocks but the split expects 10"):
        build_emulator(load(deep_dir, "llama"), OffsiteSplit(10, 2, 2, 2))
    model = load(deep_dir, "opt")
    first_two = list(decoder_blocks(model))[:2]
    set_decoder_blocks(model, first_two)
    assert list(model.model.decoder.layers) == first_two


def test_block_list_is_found_generically():
    """The ModuleList of identical blocks whose length is the config's depth wins over a
    longer list of identical experts inside each block (MoE) and over short helper lists."""
    from types import SimpleNamespace

    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Sequential(nn.Linear(2, 2)) for _ in range(8))

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_hidden_layers=3)
            self.stem = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)])
            self.trunk = nn.Module()
            self.trunk.stack = nn.ModuleList(Block() for _ in range(3))

    toy = Toy()
    assert blocks_prefix(toy) == "trunk.stack" and len(decoder_blocks(toy)) == 3
    toy.config.num_hidden_layers = None  # no depth known: the longest list of blocks
    assert blocks_prefix(toy) == "trunk.stack.0.experts"


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_emulator_structure(deep_dir, arch):
    full = load(deep_dir, arch)
    split = OffsiteSplit(L, 2, 2, 2)
    emu = build_emulator(full, split)
    kept = split.kept_indices()
    fb, eb = decoder_blocks(full), decoder_blocks(emu)
    assert len(fb) == L and len(eb) == 6 == emu.config.num_hidden_layers
    assert full.config.num_hidden_layers == L  # full model untouched
    assert emu.config.offsite_kept_layers == kept
    for key in per_layer_keys(full.config, L):  # layer_types, GPT-Neo attention_layers, ...
        assert list(getattr(emu.config, key)) == [getattr(full.config, key)[i] for i in kept]
    if arch == "gpt_neo":  # its run-length attention_types is rewritten to match
        assert per_layer_keys(full.config, L) == ["attention_layers"]
        assert emu.config.attention_layers == [["global", "local"][i % 2] for i in kept]
        assert emu.config.attention_types == [[emu.config.attention_layers, 1]]
        assert [blk.attn.attention_type for blk in eb] == emu.config.attention_layers
    if arch == "gemma3":  # a full-attention layer (index 5) is kept; types follow their blocks
        assert emu.config.layer_types.count("full_attention") == 1
        assert [blk.self_attn.is_sliding for blk in eb] == [
            t == "sliding_attention" for t in emu.config.layer_types
        ]
    # blocks: fresh objects, no duplicates, none shared with the full model
    block_ids = [id(b) for b in eb]
    assert len(set(block_ids)) == len(block_ids)
    assert not set(block_ids) & {id(b) for b in fb}
    module_ids = [id(m) for m in emu.modules()]
    assert not set(module_ids) & {id(m) for m in full.modules()}
    # no storage shared
    full_ptrs = {t.untyped_storage().data_ptr() for t in full.state_dict().values()}
    emu_ptrs = {t.untyped_storage().data_ptr() for t in emu.state_dict().values()}
    assert not full_ptrs & emu_ptrs
    # same values and shapes as the kept blocks; KV-cache slots renumbered
    for j, i in enumerate(kept):
        fsd, esd = fb[i].state_dict(), eb[j].state_dict()
        assert fsd.keys() == esd.keys()
        for k in fsd:
            assert esd[k].shape == fsd[k].shape and torch.equal(esd[k], fsd[k])
        idxs = {getattr(m, a) for m in eb[j].modules() for a in ("layer_idx", "layer_id")
                if isinstance(getattr(m, a, None), int)}
        assert idxs == {j}
    full_shapes = {n: p.shape for n, p in full.named_parameters()}
    prefix = blocks_prefix(emu)
    for name, p in emu.named_parameters():
        j = block_index(name, prefix)
        fname = name if j is None else name.replace(f"{prefix}.{j}.", f"{prefix}.{kept[j]}.", 1)
        assert full_shapes[fname] == p.shape
    # head travels with the emulator, tied or not (FATE-LLM lost LLaMA's untied lm_head)
    head_w = emu.get_output_embeddings().weight
    assert torch.equal(head_w, full.get_output_embeddings().weight)
    tied = head_w is emu.get_input_embeddings().weight
    assert tied == (full.get_output_embeddings().weight is full.get_input_embeddings().weight)
    assert tied == (arch not in UNTIED)
    # forward/backward, and generate with a KV cache matching a cache-free forward
    x = ids()
    out = emu(input_ids=x, labels=x)
    out.loss.backward()
    assert all(p.grad is not None for p in eb[3].parameters())
    emu.generation_config.eos_token_id = None  # greedy may hit eos early: no stop
    gen = emu.generate(x[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, x.shape[1] + 4)
    with torch.no_grad():
        greedy = x[:1]
        for _ in range(4):
            nxt = emu(input_ids=greedy, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            greedy = torch.cat([greedy, nxt], dim=1)
    assert torch.equal(gen, greedy)


@pytest.mark.parametrize("arch", ["gpt_neo", "gemma3"])
def test_layer_drop_composes_and_keeps_per_layer_lists_aligned(deep_dir, arch):
    full = load(deep_dir, arch)
    first = build_emulator(full, OffsiteSplit(L, 1, 1, 4))
    assert first.config.offsite_kept_layers == [0, 1, 3, 4, 6, 7]
    second = build_emulator(first, OffsiteSplit(6, 1, 1, 2))  # blocks 0, 1, 4, 5 of `first`
    assert second.config.offsite_kept_layers == [0, 1, 6, 7]
    for key in per_layer_keys(full.config, L):
        assert list(getattr(second.config, key)) == [getattr(full.config, key)[i]
                                                     for i in (0, 1, 6, 7)]
    x = ids()
    assert torch.isfinite(logits(second, x)).all()


# ----------------------------------------------------------------------------- payload


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_payload_has_no_dropped_layer_and_rebuilds(deep_dir, arch):
    full = load(deep_dir, arch, scramble=True)
    split = OffsiteSplit(L, 2, 2, 1)  # keeps middle block 3; drops 2, 4, 5
    emu = build_emulator(full, split)
    payload = client_payload(emu)
    prefix = blocks_prefix(full)
    # by name: every block key maps (via kept indices) to a kept full-model block
    em_blocks = {block_index(k, prefix) for k in payload} - {None}
    assert em_blocks == set(range(split.emulator_size))
    assert {split.full_index(j) for j in em_blocks}.isdisjoint(split.dropped_indices())
    # by value: no payload tensor equals any tensor of a dropped block
    dropped = [
        t for i in split.dropped_indices() for t in decoder_blocks(full)[i].state_dict().values()
    ]
    assert dropped
    for name, t in payload.items():
        for d in dropped:
            assert not (t.shape == d.shape and torch.equal(t, d)), name
    # independent copies
    assert all(t.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
               for t, p in zip(payload.values(), emu.state_dict().values()))
    modules = {id(m): n for n, m in emu.named_modules()}
    head = modules[id(emu.get_output_embeddings())] + ".weight"
    emb = modules[id(emu.get_input_embeddings())] + ".weight"
    untied = arch in UNTIED
    assert (head in payload) == untied and emb in payload  # untied head sent; tied sent once
    # rebuild as a client does, from the config's JSON and the payload: identical logits
    arch_json = json.loads(emu.config.to_json_string(use_diff=False))
    rebuilt = emulator_from_payload(CONFIG_MAPPING[arch_json["model_type"]].from_dict(arch_json),
                                    payload)
    assert rebuilt.config.num_hidden_layers == split.emulator_size
    assert rebuilt.get_output_embeddings().weight is not None
    if untied:
        assert torch.equal(rebuilt.get_output_embeddings().weight, payload[head])
        assert not torch.equal(payload[head], payload[emb])
    x = ids()
    torch.testing.assert_close(logits(rebuilt, x), logits(emu, x), rtol=0, atol=1e-6)


def test_payload_rejects_incomplete(deep_dir):
    emu = build_emulator(load(deep_dir, "llama"), OffsiteSplit(L, 2, 2, 2))
    payload = client_payload(emu)
    del payload["lm_head.weight"]
    with pytest.raises(ValueError, match="lacks tensors.*lm_head.weight"):
        emulator_from_payload(emu.config, payload)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_full_middle_emulator_equals_full_model(deep_dir, arch):
    full = load(deep_dir, arch, scramble=arch == "gpt2")
    emu = build_emulator(full, OffsiteSplit(L, 2, 2, 4))
    x = ids(seq=9)
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding exercises the attention mask path
    torch.testing.assert_close(
        logits(emu, x, attention_mask=mask), logits(full, x, attention_mask=mask),
        rtol=0, atol=1e-5,
    )


def test_gpt2_inverse_layer_idx_scaling_kept(deep_dir):
    """GPT-2 may scale attention by 1/(layer_idx+1): blocks keep their original scale."""
    base = load(deep_dir, "gpt2")
    cfg = base.config
    cfg.scale_attn_by_inverse_layer_idx = True
    torch.manual_seed(0)
    full = AutoModelForCausalLM.from_config(cfg).eval()
    split = OffsiteSplit(L, 2, 2, 4)
    emu = build_emulator(full, split)
    x = ids()
    torch.testing.assert_close(logits(emu, x), logits(full, x), rtol=0, atol=1e-5)
    rebuilt = emulator_from_payload(emu.config, client_payload(emu))
    torch.testing.assert_close(logits(rebuilt, x), logits(full, x), rtol=0, atol=1e-5)
    # with layer drop, block 5 sits at position 3 but keeps its 1/6 scaling
    emu2 = build_emulator(full, OffsiteSplit(L, 2, 2, 2))
    rebuilt2 = emulator_from_payload(emu2.config, client_payload(emu2))
    for e in (emu2, rebuilt2):
        assert decoder_blocks(e)[3].attn.scaling == pytest.approx(8**-0.5 / 6)


# ----------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt_neox", "mpt"])
def test_plug_in_writes_adapters_into_right_blocks(deep_dir, arch):
    full = load(deep_dir, arch)
    split = OffsiteSplit(L, 2, 2, 4)
    emu = build_emulator(full, split)
    names = adapter_parameter_names(emu, split)
    frozen = emulator_frozen_names(emu, split)
    all_names = [n for n, _ in emu.named_parameters()]
    assert set(names).isdisjoint(frozen) and set(names) | set(frozen) == set(all_names)
    prefix = blocks_prefix(emu)
    assert {block_index(n, prefix) for n in names} == {0, 1, 6, 7}
    before = {k: v.clone() for k, v in full.state_dict().items()}
    with torch.no_grad():  # "tune" the adapters
        for n, p in emu.named_parameters():
            if n in names:
                p.add_(torch.randn_like(p) * 0.1)
    state = adapter_state(emu, split)
    assert list(state) == names
    written = plug_in(full, state, split)
    assert len(written) == len(names)
    fb, eb = decoder_blocks(full), decoder_blocks(emu)
    for j in split.emulator_adapter_positions():
        i = split.full_index(j)
        for (fn, fp), (en, ep) in zip(fb[i].named_parameters(), eb[j].named_parameters()):
            assert fn == en and torch.equal(fp, ep)
            assert not torch.equal(fp, before[f"{prefix}.{i}.{fn}"])
    for k, v in full.state_dict().items():
        i = block_index(k, prefix)
        if i is None or i not in split.adapter_indices():
            assert torch.equal(v, before[k]), k
    # with the whole middle kept, the tuned full model equals the tuned emulator
    x = ids()
    torch.testing.assert_close(logits(full, x), logits(emu, x), rtol=0, atol=1e-5)


def test_plug_in_maps_top_adapters_with_layer_drop(deep_dir):
    full = load(deep_dir, "qwen2")
    split = OffsiteSplit(L, 1, 3, 1)  # emulator blocks: 0 | 3 | 5 6 7
    emu = build_emulator(full, split)
    prefix = blocks_prefix(emu)
    state = adapter_state(emu, split)
    assert {block_index(k, prefix) for k in state} == {0, 2, 3, 4}
    marked = {k: torch.full_like(v, 10.0 + block_index(k, prefix)) for k, v in state.items()}
    fb = decoder_blocks(full)
    others = {i: [p.clone() for p in fb[i].parameters()] for i in (1, 2, 3, 4)}
    plug_in(full, marked, split)
    for j, i in [(0, 0), (2, 5), (3, 6), (4, 7)]:
        assert all(torch.all(p == 10.0 + j) for p in fb[i].parameters())
    for i, ps in others.items():
        assert all(torch.equal(a, b) for a, b in zip(fb[i].parameters(), ps))
    bad = {k.replace(f"{prefix}.2.", f"{prefix}.1.", 1): v for k, v in state.items()}
    with pytest.raises(KeyError, match="emulator block 1, not an adapter block"):
        plug_in(full, bad, split)
    partial = dict(list(state.items())[:3])
    with pytest.raises(KeyError, match="lacks adapter parameters"):
        plug_in(full, partial, split)


def test_lora_on_adapters_merge_then_plug_in(deep_dir):
    from peft import LoraConfig, get_peft_model

    full = load(deep_dir, "llama")
    split = OffsiteSplit(L, 2, 2, 4)
    emu = build_emulator(full, split)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        layers_to_transform=split.emulator_adapter_positions(),
    )
    peft_emu = get_peft_model(emu, cfg)
    assert len(decoder_blocks(peft_emu)) == split.emulator_size
    assert blocks_prefix(peft_emu) == "model.layers"
    lora_blocks = {
        int(re.search(r"layers\.(\d+)\.", n).group(1))
        for n, _ in peft_emu.named_parameters() if "lora_" in n
    }
    assert lora_blocks == set(split.emulator_adapter_positions())
    with torch.no_grad():
        for n, p in peft_emu.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    x = ids()
    tuned = logits(peft_emu, x)
    with pytest.raises(TypeError, match="merge_lora"):
        adapter_state(peft_emu, split)
    merged = merge_lora(peft_emu)
    torch.testing.assert_close(logits(merged, x), tuned, rtol=0, atol=1e-5)
    assert not torch.allclose(tuned, logits(full, x), atol=1e-3)
    plug_in(full, adapter_state(merged, split), split)
    torch.testing.assert_close(logits(full, x), tuned, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- training


def test_distill_emulator_lowers_mse(deep_dir):
    full = load(deep_dir, "llama")
    split = OffsiteSplit(L, 2, 2, 1)
    emu = build_emulator(full, split)
    before = {k: v.clone() for k, v in emu.state_dict().items()}
    full_before = {k: v.clone() for k, v in full.state_dict().items()}
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, :4] = 0
    batches = [{"input_ids": ids(4, 12, seed=s), "attention_mask": mask} for s in range(3)]
    losses = distill_emulator(full, emu, split, batches, steps=30, lr=3e-3)
    assert len(losses) == 30
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    # only the emulator (middle) block moved; full model untouched; grads flags restored
    prefix = blocks_prefix(emu)
    for k, v in emu.state_dict().items():
        moved = not torch.equal(v, before[k])
        if block_index(k, prefix) == 2 and "weight" in k:
            assert moved, k
        elif block_index(k, prefix) != 2:
            assert not moved, k
    assert all(torch.equal(v, full_before[k]) for k, v in full.state_dict().items())
    assert all(p.requires_grad for p in emu.parameters())
    # a fresh check on held-out text: the distilled emulator tracks the full model better
    x = ids(2, 12, seed=99)
    with torch.no_grad():
        target = full(input_ids=x, output_hidden_states=True).hidden_states[L - split.top]
        fresh = build_emulator(full, split)
        h_new = emu(input_ids=x, output_hidden_states=True).hidden_states[3]
        h_old = fresh(input_ids=x, output_hidden_states=True).hidden_states[3]
    assert (h_new - target).pow(2).mean() < (h_old - target).pow(2).mean()
    with pytest.raises(ValueError, match="emulator_layers > 0"):
        distill_emulator(full, build_emulator(full, OffsiteSplit(L, 2, 2, 0)),
                         OffsiteSplit(L, 2, 2, 0), batches, steps=1)


def test_training_adapters_only_lowers_lm_loss(deep_dir):
    full = load(deep_dir, "gpt2")
    split = OffsiteSplit(L, 2, 2, 2)
    emu = build_emulator(full, split)
    trainable = mark_adapters_trainable(emu, split)
    assert set(trainable) == set(adapter_parameter_names(emu, split))
    frozen_before = {
        n: p.clone() for n, p in emu.named_parameters() if n in emulator_frozen_names(emu, split)
    }
    opt = torch.optim.AdamW([p for p in emu.parameters() if p.requires_grad], lr=1e-2)
    x = ids(4, 10)
    emu.train()
    losses = []
    for _ in range(12):
        loss = emu(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # the frozen tiny head (std 0.02) caps how far the loss can fall; it still must clearly fall
    assert losses[-1] < losses[0] - 0.2 and losses[-1] < min(losses[:6])
    params = dict(emu.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen_before.items())
    full_params = dict(full.named_parameters())
    assert any(not torch.equal(params[n], full_params[n]) for n in trainable)

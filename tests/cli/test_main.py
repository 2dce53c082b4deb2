"""The `fatellm` command line: subcommands, exit codes, and the installed entry point."""

import shutil
import subprocess
import sys
from pathlib import Path

from fatellm_flwr.cli.main import main


def test_runs_lists_the_runs(cli_runs, capsys):
    assert main(["runs", str(cli_runs["homo"].parent)]) == 0
    out = capsys.readouterr().out
    for name in ("homo", "fedkseed", "offsite"):
        assert f"| {name}" in out
    assert "accuracy" in out and "finished" in out


def test_errors_exit_2_with_the_reason(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_console_script_is_installed(cli_runs):
    exe = shutil.which("fatellm") or str(Path(sys.executable).with_name("fatellm"))
    proc = subprocess.run([exe, "runs", str(cli_runs["homo"])], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| homo" in proc.stdout


def test_check_config_names_an_unknown_key(capsys):
    assert main(["check-config", 'peft-method="ia3" num-server-rounds=5']) == 0
    assert "OK: algorithm=homo" in capsys.readouterr().out
    assert main(["check-config", 'peft-methd="ia3"']) == 2
    err = capsys.readouterr().err
    assert "unknown run-config key 'peft-methd'" in err and "peft-method" in err

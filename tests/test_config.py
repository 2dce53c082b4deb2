import tomllib
from pathlib import Path

import pytest

from fatellm_flwr.config import Config, ConfigError, config_table_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_key_with_a_valid_value():
    app_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert sorted(app_cfg) == sorted(Config.keys())
    cfg = Config.from_run_config(app_cfg)
    assert cfg.model == "builtin:smollm2-135m-instruct"
    assert cfg.dataset == "builtin:bbc-news"


def test_round_trip_and_replace():
    cfg = Config.from_run_config({"lora-r": 4, "lr": 1e-3})
    assert cfg.lora_r == 4 and cfg.lr == 1e-3
    assert Config.from_run_config(cfg.to_run_config()) == cfg
    assert cfg.replace(lora_r=16).lora_r == 16


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError,
                       match=r"unknown run-config key 'lora-rank'\. Did you mean 'lora-r"):
        Config.from_run_config({"lora-rank": 8})


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("peft-method", "adalora", r"'peft-method' has value 'adalora'; allowed: lora, ia3"),
        ("lora-r", 0, r"'lora-r' has value 0; it must be >= 1"),
        ("lora-dropout", 1.0, r"'lora-dropout' has value 1.0; it must be < 1"),
        ("lr", 0.0, r"'lr' has value 0.0; it must be > 0"),
        ("lora-r", "eight", r"'lora-r' must be an integer, got 'eight'"),
        ("server-eval", "maybe", r"'server-eval' must be true or false"),
        ("quantization", "3bit", r"allowed: none, 8bit, 4bit"),
        ("fraction-fit", 1.5, r"must be <= 1"),
    ],
)
def test_bad_values_are_named(key, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Config.from_run_config({key: value})


def test_bad_combinations():
    with pytest.raises(ConfigError, match="min-available-clients"):
        Config.from_run_config({"min-fit-clients": 3, "min-available-clients": 2})
    with pytest.raises(ConfigError, match="local-steps=0 and local-epochs=0"):
        Config.from_run_config({"local-steps": 0})
    with pytest.raises(ConfigError, match="proximal-mu"):
        Config.from_run_config({"aggregator": "fedprox"})


def test_best_metric_and_server_validation_combinations():
    ok = Config.from_run_config({"server-val-size": 10, "best-metric": "server_val_accuracy"})
    assert (ok.server_val_size, ok.best_metric) == (10, "server_val_accuracy")
    with pytest.raises(ConfigError, match=r"'best-metric' has value 'server_accuracy'.*"
                                          r"server_val_<metric>.*bias"):
        Config.from_run_config({"best-metric": "server_accuracy"})
    with pytest.raises(ConfigError, match="needs server-val-size > 0"):
        Config.from_run_config({"best-metric": "server_val_loss"})
    with pytest.raises(ConfigError, match="fraction-evaluate > 0, got 0"):
        Config.from_run_config({"best-metric": "eval_loss", "fraction-evaluate": 0.0})
    with pytest.raises(ConfigError, match="server-val-size=5 needs data on the server"):
        Config.from_run_config({"server-val-size": 5, "server-eval-dataset": "none"})
    with pytest.raises(ConfigError, match="FedMKT's clients evaluate their own"):
        Config.from_run_config({"algorithm": "fedmkt", "slm-models": "x",
                                "best-metric": "eval_loss", "fraction-evaluate": 1.0})
    with pytest.raises(ConfigError, match=r"'server-val-size' has value -1"):
        Config.from_run_config({"server-val-size": -1})


def test_int_accepts_integral_float_and_bool_strings():
    cfg = Config.from_run_config({"lora-r": 4.0, "plots": "false"})
    assert cfg.lora_r == 4 and cfg.plots is False


def test_readme_table_is_current():
    readme = (ROOT / "README.md").read_text()
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config_table_markdown(app) in readme, \
        "regenerate the README table: python scripts/sync_config.py"


def test_check_run_config_names_what_the_superlink_does_not(tmp_path):
    """Flower's SuperLink refuses an unknown --run-config key with only "Invalid run
    configuration"; the offline check parses the same syntax and names the key."""
    from fatellm_flwr.config import check_run_config

    cfg = check_run_config('peft-method="ia3" num-server-rounds=5 lr=1e-3 plots=false')
    assert (cfg.peft_method, cfg.num_server_rounds, cfg.lr, cfg.plots) == ("ia3", 5, 1e-3, False)
    assert check_run_config("").to_run_config() == Config.from_run_config(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    ).to_run_config()  # pyproject's defaults, as `flwr run .` uses
    with pytest.raises(ConfigError, match=r"unknown run-config key 'peft-methd'.*'peft-method'"):
        check_run_config('peft-methd="ia3"')
    with pytest.raises(ConfigError, match=r"pair 'peft-method=ia3' is not valid.*"
                                          r'peft-method="ia3"'):
        check_run_config("num-server-rounds=2 peft-method=ia3")
    with pytest.raises(ConfigError, match=r"'lora-r' has value 0; it must be >= 1"):
        check_run_config({"lora-r": 0})
    with pytest.raises(ConfigError, match="proximal-mu"):
        check_run_config('aggregator="fedprox"')
    # a Config key missing from the app's pyproject is refused by Flower: say so
    (tmp_path / "pyproject.toml").write_text('[tool.flwr.app.config]\nlr = 0.001\n')
    with pytest.raises(ConfigError, match=r"'lora-r' is a Config field but missing from "
                                          r"pyproject.toml"):
        check_run_config("lora-r=4", project_dir=tmp_path)


def test_python_dash_m_config_prints_ok_or_the_error():
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "fatellm_flwr.config", *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)

    ok = run('peft-method="lora" lora-r=4')
    assert ok.returncode == 0 and ok.stdout.strip() == "OK"
    bad = run("lora-rank=4")
    assert bad.returncode == 2 and "ConfigError: unknown run-config key 'lora-rank'" in bad.stderr

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
    with pytest.raises(ConfigError, match=r"unknown run-config key 'lora-rank'.*'lora-r'"):
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


def test_int_accepts_integral_float_and_bool_strings():
    cfg = Config.from_run_config({"lora-r": 4.0, "plots": "false"})
    assert cfg.lora_r == 4 and cfg.plots is False


def test_readme_table_is_current():
    readme = (ROOT / "README.md").read_text()
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config_table_markdown(app) in readme, \
        "regenerate the README table: python scripts/sync_config.py"

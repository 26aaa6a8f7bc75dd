"""Config: TOML + dotted overrides, errors that name the key and the fix, round trip of the resolved file."""

from pathlib import Path

import pytest

from rlcs_fast.config import Config, ConfigError, all_keys, dump_toml, load_config, parse_args

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    out = tmp_path / "config.toml"
    out.write_text(dump_toml(cfg))
    assert load_config(out) == cfg


def test_overrides_are_toml_values():
    cfg, _ = parse_args(["--cfg", str(CONFIGS[0]), "--optim.lr", "1e-6", "--run.stages", '["grpo"]',
                         "--grpo.n=4", "--model.path", "some/dir", "--log.progress", "false"])
    assert cfg.optim.lr == 1e-6 and cfg.run.stages == ["grpo"] and cfg.grpo.n == 4
    assert cfg.model.path == "some/dir" and cfg.log.progress is False


@pytest.mark.parametrize("argv, key, hint", [
    (["--optim.lrr", "1e-5"], "optim.lrr", "optim.lr"),
    (["--optm.lr", "1e-5"], "optm.lr", "optim.lr"),
    (["--grpo.kl_cof", "0.1"], "grpo.kl_cof", "grpo.kl_coef"),
])
def test_typo_names_key_and_nearest(argv, key, hint):
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    assert f"`{key}`" in str(e.value) and f"`{hint}`" in str(e.value)


def test_typo_in_file_names_key(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[optim]\nlrr = 1e-5\n")
    with pytest.raises(ConfigError, match=r"`optim\.lrr`.*`optim\.lr`"):
        load_config(f)


@pytest.mark.parametrize("override, key", [
    ({"optim.lr": "fast"}, "optim.lr"),
    ({"grpo.kl_type": "k9"}, "grpo.kl_type"),
    ({"grpo.n": 1}, "grpo.n"),
    ({"run.stages": ["grpo", "sft"]}, "run.stages"),
    ({"run.stages": ["rl"]}, "run.stages"),
    ({"grpo.mini_batch_size": 5}, "grpo.mini_batch_size"),
    ({"data.prompt_template": "no placeholder"}, "data.prompt_template"),
    ({"reward.function": "nomodule"}, "reward.function"),
    ({"sft.global_batch_size": 0}, "sft.global_batch_size"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"`{key}`"):
        load_config(None, override)


def test_every_key_reachable_by_override():
    for key in all_keys():
        section, name = key.split(".")
        value = getattr(getattr(Config(), section), name)
        assert getattr(getattr(load_config(None, {key: value}), section), name) == value


def test_cli_reports_config_error(capsys):
    from rlcs_fast.train import main

    assert main(["--optim.lrr", "1e-5"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "optim.lr" in err

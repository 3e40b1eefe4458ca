"""`base:` extension merges mappings key by key; `!replace` replaces an inherited mapping whole."""

from __future__ import annotations

import pytest

from alp_agent.config_io import ConfigError, load_config, read_yaml_with_base


def test_base_merges_and_replace_replaces(tmp_path):
    from alp_agent.config import RunConfig

    (tmp_path / "base.yaml").write_text(
        "env:\n  kwargs: {dataset: {name: synthetic, seed: 0}, max_turns: 3}\neval:\n  env_kwargs: {dataset: {seed: 1}}\n"
    )
    (tmp_path / "merge.yaml").write_text("base: base.yaml\nenv:\n  kwargs: {max_turns: 5}\n")
    (tmp_path / "replace.yaml").write_text(
        "base: base.yaml\nenv:\n  kwargs: !replace {max_turns: 5}\neval:\n  env_kwargs: !replace {}\n"
    )
    merged = read_yaml_with_base(tmp_path / "merge.yaml")
    assert merged["env"]["kwargs"] == {"dataset": {"name": "synthetic", "seed": 0}, "max_turns": 5}
    replaced = read_yaml_with_base(tmp_path / "replace.yaml")
    assert replaced["env"]["kwargs"] == {"max_turns": 5} and replaced["eval"]["env_kwargs"] == {}
    assert type(replaced["env"]["kwargs"]) is dict  # no marker class leaks into the config
    cfg = load_config(RunConfig, tmp_path / "replace.yaml", ["env.kwargs.tool_format=json"])
    assert cfg.env.kwargs == {"max_turns": 5, "tool_format": "json"}

    (tmp_path / "bad.yaml").write_text("base: base.yaml\nenv:\n  kwargs: !replace 3\n")
    with pytest.raises(ConfigError, match="!replace applies to a mapping"):
        read_yaml_with_base(tmp_path / "bad.yaml")


def test_eval_defaults_do_not_assume_the_math_env():
    from alp_agent.config import RunConfig

    assert RunConfig().eval.env_kwargs == {}

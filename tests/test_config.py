"""Tests for recgen.config: validation, TOML round trip, --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from recgen.config import (
    GenerationConfig,
    RecommenderConfig,
    SASRecConfig,
    cache_dir,
    dump_config,
    load_config,
    parse_override,
)
from recgen.errors import ConfigError


def test_defaults_round_trip_through_toml(tmp_path: Path) -> None:
    config = load_config(overrides=["generation.temperature=0.7", "n=20", "collab.method=popular"])
    path = dump_config(config, tmp_path / "config.toml")
    assert load_config(path) == config
    assert config.generation.temperature == 0.7
    assert config.n == 20
    assert config.collab.method == "popular"


def test_unknown_key_fails_loudly_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[generation]\ntemprature = 0.5\n")
    with pytest.raises(ConfigError, match=r"generation\.temprature") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_bad_value_names_key_value_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("n = 0\n")
    with pytest.raises(ConfigError, match=r"n: .*got 0"):
        load_config(path)


def test_invalid_toml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("n = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("generation.temperature=0.5", ["generation", "temperature"], 0.5),
        ("n=7", ["n"], 7),
        ("generation.model=some/folder", ["generation", "model"], "some/folder"),
        ('prompt.template="rerank"', ["prompt", "template"], "rerank"),
        ("collab.sasrec.dropout = 0.3", ["collab", "sasrec", "dropout"], 0.3),
    ],
)
def test_parse_override(text: str, path: list[str], value: object) -> None:
    assert parse_override(text) == (path, value)


def test_override_without_equals_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("generation.temperature")


def test_cross_field_checks() -> None:
    with pytest.raises(ValueError, match="divisible"):
        SASRecConfig(hidden=50, heads=4)
    with pytest.raises(ValueError, match="num_beams"):
        GenerationConfig(num_return_sequences=3)
    assert GenerationConfig(num_return_sequences=3, num_beams=3).num_beams == 3
    assert GenerationConfig(num_return_sequences=3, temperature=0.8).temperature == 0.8


def test_configs_are_frozen() -> None:
    config = RecommenderConfig()
    with pytest.raises(ValueError, match="frozen"):
        config.n = 5  # type: ignore[misc]


def test_cache_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECGEN_CACHE", str(tmp_path / "c"))
    path = cache_dir("models", "x")
    assert path == tmp_path / "c" / "models" / "x"
    assert path.is_dir()

"""The command line's own logic (the pipeline it drives is tested elsewhere)."""

from __future__ import annotations

from pathlib import Path

import pytest

from recgen.cli import DEMO_ADAPTER, demo_adapter
from recgen.config import load_config
from recgen.errors import ConfigError


def test_the_demo_uses_the_committed_adapter_on_movielens() -> None:
    assert (DEMO_ADAPTER / "adapter_config.json").is_file()  # committed with the repository
    assert demo_adapter(load_config(), "auto") == str(DEMO_ADAPTER)
    assert demo_adapter(load_config(), "none") is None


def test_the_demo_adapter_follows_the_config_and_the_data(tmp_path: Path) -> None:
    other_data = load_config(overrides=[f"data.source={tmp_path}"])
    assert demo_adapter(other_data, "auto") is None  # the adapter knows MovieLens titles only
    named = load_config(overrides=[f"generation.adapter={tmp_path}"])
    assert demo_adapter(named, "auto") == str(tmp_path)
    assert demo_adapter(load_config(), str(DEMO_ADAPTER)) == str(DEMO_ADAPTER)
    with pytest.raises(ConfigError, match=r"--adapter '.*nowhere' is not a peft adapter folder"):
        demo_adapter(load_config(), str(tmp_path / "nowhere"))

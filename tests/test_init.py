"""Tests for the public API in recgen/__init__.py."""

from __future__ import annotations

import subprocess
import sys

import recgen


def test_every_public_name_resolves() -> None:
    for name in recgen.__all__:
        assert getattr(recgen, name) is not None, name
    from recgen import Recommender
    from recgen.pipeline import Recommender as Direct

    assert Recommender is Direct


def test_import_recgen_does_not_import_torch() -> None:
    code = "import sys, recgen; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

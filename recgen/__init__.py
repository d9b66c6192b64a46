"""recgen: a generative recommender on a small local LLM."""

from __future__ import annotations

__version__ = "0.1.0"

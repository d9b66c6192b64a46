"""``recgen finetune`` and ``recgen adapter merge``: thin click commands over recgen.adapters."""

from __future__ import annotations

import json
from pathlib import Path

import click

from recgen.adapters import FinetuneConfig, merge_adapter
from recgen.config import load_config
from recgen.errors import RecgenError
from recgen.training import train_adapter

__all__ = ["adapter", "finetune"]


@click.command()
@click.option("--config", type=click.Path(path_type=Path), help="A fine-tuning TOML config.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one config key, e.g. --set lr=1e-4")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Adapter folder.")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.")
def finetune(config: Path | None, overrides: tuple[str, ...], out: Path, resume: bool) -> None:
    """Fine-tune a LoRA or prefix-tuning adapter on the training split."""
    try:
        cfg = load_config(config, overrides=list(overrides), model=FinetuneConfig)
        summary = train_adapter(cfg, out, resume=resume)
    except RecgenError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(summary, indent=2))


@click.group()
def adapter() -> None:
    """Manage fine-tuned adapters."""


@adapter.command()
@click.argument("folder", type=click.Path(path_type=Path, exists=True))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Merged model folder.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16")
def merge(folder: Path, out: Path, dtype: str) -> None:
    """Merge a LoRA adapter into its base model (a plain model folder for vLLM)."""
    try:
        merge_adapter(folder, out, dtype=dtype)
    except RecgenError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"merged model in {out}")

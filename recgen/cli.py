"""The ``recgen`` command line: demo, recommend, eval (a thin layer over the Python API)."""

from __future__ import annotations

import logging
import random
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.panel import Panel
from rich.table import Table

from recgen import data, evaluate, splits
from recgen.config import RecommenderConfig, load_config
from recgen.errors import ConfigError, RecgenError
from recgen.pipeline import Recommender, Trace
from recgen.types import Catalog, Example, RecDataset

_console = Console()


@click.group()
@click.option("-v", "--verbose", count=True, help="-v for info logs, -vv for debug.")
def cli(verbose: int) -> None:
    """recgen: generative recommendations with a small local LLM."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=_console)])


def _config(config: Path | None, overrides: tuple[str, ...]) -> RecommenderConfig:
    return load_config(config, overrides=list(overrides))


_config_options = [
    click.option("--config", type=click.Path(path_type=Path), help="A TOML config file."),
    click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override one config key, e.g. --set generation.temperature=0.7",
    ),
]


def _with_config(f):  # type: ignore[no-untyped-def]
    for option in reversed(_config_options):
        f = option(f)
    return f


def _fit(cfg: RecommenderConfig) -> tuple[Recommender, RecDataset, list[Example]]:
    dataset = data.load_data(cfg.data)
    split = splits.split_dataset(dataset, cfg.data)
    rec = Recommender.fit(cfg, dataset=dataset, split=split)
    return rec, dataset, list(split.test)


DEMO_ADAPTER = Path(__file__).resolve().parents[1] / "finetune" / "adapters" / "ml100k-lora"
"""The LoRA adapter committed with the repository (``finetune/ml100k-lora.toml``)."""


def demo_adapter(cfg: RecommenderConfig, choice: str) -> str | None:
    """The adapter the demo loads: ``auto`` picks the committed MovieLens-100K LoRA when the
    config names no adapter, the data is ml-100k and the repository's folder is there (a
    source checkout); ``none`` the base model; anything else is an adapter folder."""
    if choice == "none":
        return None
    if choice != "auto":
        if not (Path(choice) / "adapter_config.json").is_file():
            raise ConfigError(
                f"--adapter {choice!r} is not a peft adapter folder (no adapter_config.json): "
                "pass a folder written by finetune/train.py, 'auto' or 'none'"
            )
        return choice
    if cfg.generation.adapter is not None:
        return cfg.generation.adapter
    committed = (DEMO_ADAPTER / "adapter_config.json").is_file()
    return str(DEMO_ADAPTER) if cfg.data.source == "ml-100k" and committed else None


@cli.command()
@_with_config
@click.option("--users", default=3, show_default=True, help="How many users to show.")
@click.option("-n", "--n", "n", default=10, show_default=True, help="Recommendations per user.")
@click.option(
    "--adapter", default="auto", show_default=True,
    help="A peft adapter folder; 'auto': the committed MovieLens-100K LoRA (when the data is "
    "ml-100k and the repository's finetune/ folder is present); 'none': the base model.",
)  # fmt: skip
def demo(config: Path | None, overrides: tuple[str, ...], users: int, n: int, adapter: str) -> None:
    """Recommend for a few MovieLens-100K users and show every stage."""
    cfg = _config(config, overrides)
    generation = cfg.generation.model_copy(update={"adapter": demo_adapter(cfg, adapter)})
    cfg = cfg.model_copy(update={"generation": generation})
    _console.print(f"LLM: {cfg.generation.model}" + (
        f" + adapter {cfg.generation.adapter}" if cfg.generation.adapter else " (no adapter)"))  # fmt: skip
    with _console.status("loading data, fitting the collaborative model, loading the LLM"):
        rec, dataset, test = _fit(cfg)
    chosen = random.Random(cfg.seed).sample(test, k=min(users, len(test)))
    traces = rec.trace_batch([ex.history for ex in chosen], n=n)
    for ex, trace in zip(chosen, traces, strict=True):
        _show_trace(trace, ex, dataset.catalog, rec)


def _show_trace(trace: Trace, ex: Example, catalog: Catalog, rec: Recommender) -> None:
    _console.rule(f"user {ex.user_id}: {len(trace.history)} items in history")
    recent = Table(title="recent history (newest last)", show_lines=False)
    for col in ("when", "title", "rating"):
        recent.add_column(col)
    for e in trace.history.events[-rec.config.interests.recent_window :]:
        when = (
            datetime.fromtimestamp(e.timestamp, UTC).strftime("%Y-%m-%d")
            if e.timestamp is not None and rec.real_time
            else ""
        )
        rating = "" if e.rating is None else f"{e.rating:g}"
        recent.add_row(when, catalog[e.item_id].title, rating)
    _console.print(recent)
    if trace.prompt is not None:
        _console.print(Panel(trace.prompt.messages[-1].content, title="prompt: interest summary"))
    if trace.generation is not None:
        _console.print(
            Panel(
                trace.generation.texts[0] if trace.generation.texts else "",
                title=f"LLM output ({trace.generation.model})",
            )
        )
    _console.print(_recs_table(trace))
    hit = [r.rank for r in trace.recommendations if r.item_id == ex.target]
    verdict = f"ranked #{hit[0]}" if hit else "not in the list"
    _console.print(f"held-out next item: [bold]{catalog[ex.target].title}[/bold] ({verdict})\n")


def _recs_table(trace: Trace) -> Table:
    table = Table(title="recommendations")
    for col in ("#", "title", "score", "source", "explanation"):
        table.add_column(col, overflow="fold")
    for r in trace.recommendations:
        table.add_row(str(r.rank), r.title, f"{r.score:.3f}", r.source, r.explanation)
    return table


@cli.command()
@_with_config
@click.option("--user", "user_id", help="A user id of the configured data set.")
@click.option("--title", "titles", multiple=True, help="A catalog title or item id (repeat).")
@click.option("-n", "--n", "n", default=10, show_default=True)
def recommend(
    config: Path | None,
    overrides: tuple[str, ...],
    user_id: str | None,
    titles: tuple[str, ...],
    n: int,
) -> None:
    """Recommend for a user of the data set, or for titles given on the command line."""
    if bool(user_id) == bool(titles):
        raise click.UsageError("give either --user ID or one or more --title TITLE")
    cfg = _config(config, overrides)
    with _console.status("loading"):
        rec, dataset, _ = _fit(cfg)
    if user_id is not None:
        if user_id not in dataset.histories:
            raise click.BadParameter(f"no user {user_id!r} in {dataset.name}", param_hint="--user")
        history = dataset.histories[user_id]
    else:
        history = list(titles)
    trace = rec.trace_batch([history], n=n)[0]
    _console.print(_recs_table(trace))


@cli.command(name="eval")
@_with_config
@click.option(
    "--method",
    type=click.Choice(["popular", "sasrec", "ease", "transitions", "ensemble", "recgen"]),
    default="recgen",
    show_default=True,
    help="Which ranker to evaluate.",
)
@click.option(
    "--split",
    "which",
    type=click.Choice(["valid", "test"]),
    default="valid",
    show_default=True,
    help="Tune on valid; read test once per reported run.",
)
@click.option("--users", type=int, default=None, help="Evaluate a seeded sample of users.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder.")
@click.option(
    "--backend",
    type=click.Choice(["transformers", "openai", "fake"]),
    help="Same as --set generation.backend=...; openai: a server such as `recgen serve`.",
)
@click.option(
    "--base-url", help="Same as --set generation.base_url=... (e.g. http://127.0.0.1:8000/v1)."
)
def eval_cmd(
    config: Path | None,
    overrides: tuple[str, ...],
    method: str,
    which: str,
    users: int | None,
    out: Path,
    backend: str | None = None,
    base_url: str | None = None,
) -> None:
    """Evaluate a method on a data set and protocol; writes a run folder."""
    served = [f"generation.backend={backend}"] if backend else []
    served += [f"generation.base_url={base_url}"] if base_url else []
    cfg = _config(config, (*served, *overrides))
    if method != "recgen":
        cfg = cfg.model_copy(update={"collab": cfg.collab.model_copy(update={"method": method})})
    dataset = data.load_data(cfg.data)
    split = splits.split_dataset(dataset, cfg.data)
    examples = list(split.valid if which == "valid" else split.test)
    if users is not None and users < len(examples):
        examples = random.Random(cfg.seed).sample(examples, k=users)
    rec = Recommender.fit(cfg, dataset=dataset, split=split)
    ranker = rec if method == "recgen" else evaluate.ScorerRanker(method, rec.scorer, rec.catalog)
    result = evaluate.run_evaluation(
        ranker, examples, catalog=dataset.catalog, run_dir=out, config=cfg, split=which
    )
    _console.print(result.markdown())


@cli.command()
@click.option("--model", default="embedded", show_default=True, help="Base or merged model folder.")
@click.option("--name", help="The model name requests use (default: --model as given).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=DIR", help="A LoRA adapter.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, help="0 picks a free port.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32", "auto"]), default="bfloat16")
@click.option("--venv", default=".venv-vllm", show_default=True, help="vLLM's own environment.")
@click.option(
    "--compile/--eager", "compiled", default=False, help="Compile (~2 min start, faster decoding)."
)
@click.option("--install/--no-install", default=True, help="Create --venv if it is missing.")
def serve(
    model: str,
    name: str | None,
    adapters: tuple[str, ...],
    host: str,
    port: int,
    dtype: str,
    venv: str,
    compiled: bool,
    install: bool,
) -> None:
    """Run vLLM's OpenAI-compatible server with the model and LoRA adapters until Ctrl-C."""
    from recgen import serving

    pairs = [a.partition("=") for a in adapters]
    if any(not key or not sep or not path for key, sep, path in pairs):
        raise click.BadParameter("use NAME=DIR, e.g. ml-lora=runs/ml-lora", param_hint="--adapter")
    cfg = serving.ServeConfig(
        model=model, served_name=name, adapters={key: path for key, _, path in pairs},
        host=host, port=port, dtype=dtype, venv=venv, enforce_eager=not compiled,  # type: ignore[arg-type]
    )  # fmt: skip
    python = serving.ensure_vllm_env(venv) if install else serving.vllm_python(venv)
    server = serving.VLLMServer(cfg, python=python)
    _console.print(f"starting vLLM: {' '.join(server.served_models)} (about 40 s)")
    code = serving.serve_forever(server, on_ready=lambda s: click.echo(serving.usage(s)))
    raise SystemExit(code)


def main() -> None:
    """Entry point: recgen's own errors become one readable line and exit code 2."""
    try:
        cli(standalone_mode=True)
    except RecgenError as e:
        _console.print(f"[red]error:[/red] {e}")
        raise SystemExit(2) from None


from recgen.cli_finetune import adapter, finetune  # registered last: fine-tuning commands

cli.add_command(finetune)
cli.add_command(adapter)

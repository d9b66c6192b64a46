"""Adapters: the base model, peft configs, adapter metadata and checks, and merging.

An adapter folder is a peft adapter plus ``recgen_adapter.json`` (base model, template hashes,
config, summary) and ``finetune.toml``; :func:`check_adapter` refuses one trained on another
base model or template version. Training lives in :mod:`recgen.training`.

Rerank answers start with the chosen candidate's number in the prompt's list
(``7. Heat (1995) | ...``), so :func:`candidate_scores` scores every candidate from one forward
pass over the prompt (plus one cached token for two-digit numbers), LlamaRec-style.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from recgen.adapter_data import (
    FinetuneConfig,
    LoraSettings,
    PrefixSettings,
    TaskWeights,
)
from recgen.config import PromptConfig, dump_config
from recgen.errors import ConfigError, IndexMismatchError
from recgen.verbalizer import candidate_scores

__all__ = [
    "META_FILE",
    "FinetuneConfig",
    "LoraSettings",
    "PrefixSettings",
    "TaskWeights",
    "base_model_id",
    "candidate_scores",
    "check_adapter",
    "inference_prompt",
    "load_adapter_meta",
    "load_base",
    "merge_adapter",
    "peft_config",
    "write_adapter_meta",
]

_log = logging.getLogger(__name__)

META_FILE = "recgen_adapter.json"
"""The recgen metadata file in every adapter folder (base model, template hashes, config)."""


# --------------------------------------------------------------------------- base model


def _resolve(base_model: str) -> tuple[Path, str]:
    """(local folder, display name) of ``base_model``."""
    if base_model == "embedded":
        from recgen.generation import embedded_model_dir

        path = embedded_model_dir()
        return path, path.name
    path = Path(base_model).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"base_model={base_model!r} is not 'embedded' or a local model folder with "
            "config.json (hub downloads are not used)"
        )
    return path, path.name


def base_model_id(base_model: str) -> dict[str, str]:
    """Identity of a base model: its name and a hash of its architecture (config.json).

    Args:
        base_model: ``embedded`` or a local model folder.
    """
    path, name = _resolve(base_model)
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "intermediate_size")  # fmt: skip
    arch = json.dumps({k: cfg.get(k) for k in keys}, sort_keys=True)
    return {"name": name, "arch": hashlib.sha256(arch.encode()).hexdigest()[:16]}


def load_base(base_model: str, *, dtype: str = "float32") -> tuple[Any, Any]:
    """(tokenizer, model) of the base model, weights read into memory (no mmap); ``dtype``:
    ``auto`` (bf16 where the CPU has it natively), ``bfloat16`` or ``float32``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recgen.generation import torch_dtype as resolve

    path, _ = _resolve(base_model)
    torch_dtype = resolve(dtype)
    _log.info("base model %s in %s", base_model, torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, disable_mmap=True)
    return tokenizer, model


def peft_config(config: FinetuneConfig, *, num_layers: int | None = None) -> Any:
    """The peft ``LoraConfig`` or ``PrefixTuningConfig`` for ``config``.

    Args:
        config: The run's configuration.
        num_layers: The base model's decoder layers; needed with ``lora.top_layers``.

    Raises:
        ConfigError: if ``lora.top_layers`` is set without ``num_layers`` or exceeds it.
    """
    import peft

    if config.method == "prefix":
        return peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=config.prefix.num_virtual_tokens
        )
    targets: Any = (
        "all-linear" if config.lora.targets == ("all-linear",) else list(config.lora.targets)
    )
    layers = None
    if (top := config.lora.top_layers) is not None:
        if num_layers is None or top > num_layers:
            raise ConfigError(
                f"lora.top_layers={top} needs a base model with at least that many decoder "
                f"layers (it has {num_layers}): lower lora.top_layers or leave it unset"
            )
        layers = list(range(num_layers - top, num_layers))
    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=targets,
        layers_to_transform=layers,
    )


# --------------------------------------------------------------------------- metadata


def write_adapter_meta(
    folder: str | Path,
    config: FinetuneConfig,
    *,
    template_hashes: dict[str, str],
    summary: dict[str, Any] | None = None,
) -> Path:
    """Write ``recgen_adapter.json`` and ``finetune.toml`` into an adapter folder.

    Args:
        folder: The adapter folder (``save_pretrained`` output).
        config: The run's config.
        template_hashes: Template name -> hash of the templates the examples were rendered with.
        summary: Training results to record (steps, losses, times).
    """
    import recgen

    folder = Path(folder)
    meta = {
        "recgen_version": recgen.__version__,
        "method": config.method,
        "base_model": config.base_model,
        "base": base_model_id(config.base_model),
        "template_hashes": dict(sorted(template_hashes.items())),
        "config": json.loads(config.model_dump_json()),
        "summary": summary or {},
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    dump_config(config, folder / "finetune.toml")
    (folder / "README.md").write_text(_model_card(config, meta["summary"]), encoding="utf-8")
    return folder / META_FILE


def _model_card(config: FinetuneConfig, summary: dict[str, Any]) -> str:
    """A short, true model card (replacing peft's template of placeholders)."""
    tasks = ", ".join(f"{k} {v:g}" for k, v in config.tasks.model_dump().items() if v)
    facts = {
        "method": config.method,
        "base model": config.base_model,
        "data": f"{config.data.source} ({config.data.protocol}), training split only",
        "tasks (weights)": tasks,
        "rerank loss": config.rerank_loss,
        **{k.replace("_", " "): v for k, v in summary.items()},
    }
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
    return (
        f"# recgen {config.method} adapter\n\nA peft adapter for recgen's LLM. Load it with "
        "`generation.adapter=<this folder>`; recgen refuses it on another base model or prompt "
        "template version (`recgen_adapter.json`). The full config is `finetune.toml`, the "
        f"per-step log `training_log.jsonl`.\n\n| | |\n|---|---|\n{rows}\n"
    )


def load_adapter_meta(folder: str | Path) -> dict[str, Any]:
    """Read an adapter's ``recgen_adapter.json``.

    Raises:
        ConfigError: if the folder is not an adapter saved by recgen.
    """
    path = Path(folder) / META_FILE
    if not (Path(folder) / "adapter_config.json").is_file() or not path.is_file():
        raise ConfigError(
            f"{folder} is not a recgen adapter folder (needs adapter_config.json and {META_FILE});"
            " train one with finetune/train.py or `recgen finetune`"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def check_adapter(
    folder: str | Path,
    *,
    base_model: str | None,
    template: str | None = None,
    template_hash: str | None = None,
) -> dict[str, Any]:
    """Check that an adapter fits a base model and prompt template before loading it.

    Args:
        folder: The adapter folder.
        base_model: The base model it will be loaded onto (``embedded`` or a folder); None
            when a server loads it (the client cannot see the server's base model).
        template: The template name prompts will be rendered with (optional).
        template_hash: That template's current hash (``PromptRenderer.template_hash``).

    Returns:
        The adapter's metadata.

    Raises:
        ConfigError: if the folder is not a recgen adapter.
        IndexMismatchError: if it was trained on another base model, or with another version
            of the template (retrain, or restore the template it was trained with).
    """
    meta = load_adapter_meta(folder)
    want = base_model_id(base_model) if base_model is not None else None
    have = meta.get("base", {})
    if want is not None and have != want:
        raise IndexMismatchError(
            f"adapter {folder} was trained on base model {have.get('name')!r} (arch "
            f"{have.get('arch')}), not {base_model!r} = {want['name']!r} (arch {want['arch']}); "
            f"load it onto base_model={meta.get('base_model')!r} or train a new adapter"
        )
    hashes: dict[str, str] = meta.get("template_hashes", {})
    if template is not None and template_hash is not None:
        if template not in hashes:
            _log.warning(
                "adapter %s was not trained on template %r (only %s)", folder, template,
                sorted(hashes),
            )  # fmt: skip
        elif hashes[template] != template_hash:
            raise IndexMismatchError(
                f"adapter {folder} was trained with template {template!r} hash "
                f"{hashes[template]}, but the current template hashes to {template_hash}; the "
                "prompt changed since training: retrain the adapter or restore the template"
            )
    return meta


def inference_prompt(folder: str | Path, *, template: str = "rerank") -> PromptConfig:
    """The prompt settings an adapter's ``template`` examples were rendered with.

    Render inference prompts with these (and the adapter's ``interests`` config, in
    ``load_adapter_meta(folder)["config"]["interests"]``) so they match what the adapter saw:
    rerank examples ask for one pick (``n_titles=1``) and use the training token budget.
    ``"rerank"`` means the adapter's rerank template (``prompt.rerank_template``, e.g.
    ``rerank-pop``), so the result's ``template`` is the one to render.

    Raises:
        ConfigError: if the folder is not a recgen adapter.
    """
    config = FinetuneConfig.model_validate(load_adapter_meta(folder)["config"])
    if template == "rerank":
        template = config.prompt.rerank_template
    n_titles = 1 if template == config.prompt.rerank_template else config.prompt.n_titles
    return config.prompt.for_template(template, n_titles=n_titles)


# --------------------------------------------------------------------------- merge


def merge_adapter(folder: str | Path, out_dir: str | Path, *, dtype: str = "bfloat16") -> Path:
    """Merge a LoRA adapter into its base model and write a plain model folder (for vLLM).

    Args:
        folder: A recgen LoRA adapter folder.
        out_dir: Where to write the merged model, tokenizer and ``merged_from.json``.
        dtype: ``bfloat16`` (what vLLM on CPU runs) or ``float32``.

    Raises:
        ConfigError: for a prefix-tuning adapter (its prefixes are not weights that can be
            merged; serve it with the transformers backend), or a folder that is not an adapter.
    """
    import torch
    from peft import PeftModel

    meta = load_adapter_meta(folder)
    if meta.get("method") != "lora":
        raise ConfigError(
            f"adapter {folder} is {meta.get('method')!r}: only LoRA adapters merge into the "
            "weights; prefix-tuning is served by the transformers backend "
            "(generation.adapter=...), not by vLLM"
        )
    check_adapter(folder, base_model=meta["base_model"])
    tokenizer, base = load_base(meta["base_model"], dtype="float32")
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    merged = merged.to(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    provenance = {"adapter": str(Path(folder).resolve()), "dtype": dtype, **meta}
    (out / "merged_from.json").write_text(json.dumps(provenance, indent=2), encoding="utf-8")
    shutil.copy(Path(folder) / "finetune.toml", out / "finetune.toml")
    _log.info("merged %s into %s (%s)", folder, out, dtype)
    return out

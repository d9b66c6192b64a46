"""Fine-tune a peft adapter (LoRA or prefix-tuning) for recgen, read top to bottom.

    .venv/bin/python finetune/train.py finetune/ml100k-lora.toml --out finetune/adapters/ml100k-lora
    .venv/bin/python finetune/train.py finetune/ml100k-lora.toml --out ... --resume
    .venv/bin/python finetune/train.py finetune/ml100k-lora.toml --out ... --set max_steps=20

The config (every key documented in ``recgen.adapter_data.FinetuneConfig``) comes first; ``--set``
overrides single keys. Training data is built from the training split only and cached; a killed
run continues exactly with ``--resume``. The output folder is a peft adapter with its config,
base model id, prompt-template hashes and training log. Continual update: ``--set
init_adapter=<old adapter> --set new_since=<unix time>`` trains on interactions after that time
with a ``replay`` share of older ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from recgen.adapters import FinetuneConfig
from recgen.config import load_config
from recgen.training import train_adapter


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, nargs="?", help="TOML config (default: defaults)")
    parser.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key, e.g. --set lr=1e-4")  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # 1. config: TOML, then --set overrides; unknown keys fail
    config = load_config(args.config, overrides=args.overrides, model=FinetuneConfig)
    print(f"config ({args.config or 'defaults'}):\n{config.model_dump_json(indent=2)}")
    # 2. train (data built from the training split, cached; checkpoints in --out/checkpoint)
    start = time.perf_counter()
    summary = train_adapter(config, args.out, resume=args.resume)
    # 3. report
    print(json.dumps(summary, indent=2))
    print(f"adapter in {args.out} after {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()

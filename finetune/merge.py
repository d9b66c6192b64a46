"""Merge a LoRA adapter into its base model and write a plain model folder for vLLM.

    .venv/bin/python finetune/merge.py finetune/adapters/ml100k-lora --out models/ml100k-merged

A merged model serves about 2.5x faster in vLLM on CPU than the unmerged adapter. Prefix-tuning
adapters cannot be merged (serve them with the transformers backend) and are refused.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from recgen.adapters import merge_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path, help="a recgen LoRA adapter folder")
    parser.add_argument("--out", type=Path, required=True, help="merged model folder to write")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = merge_adapter(args.adapter, args.out, dtype=args.dtype)
    print(f"merged model in {out}: serve with --model {out}")


if __name__ == "__main__":
    main()

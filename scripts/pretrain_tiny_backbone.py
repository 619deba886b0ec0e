"""Reproduce the embedded tiny backbone (sam_mllm/assets/tiny_backbone) from scratch.

    python scripts/pretrain_tiny_backbone.py [--out sam_mllm/assets/tiny_backbone] [key=value ...]

1. generates the synthetic world's single-image pre-training split (seed 0);
2. trains an InstructBLIP-shaped model of the `demo` dimensions with every weight trainable
   (configs/demo/pretrain_backbone.yaml, through the ordinary training recipe);
3. exports it as a Hugging Face InstructBLIP directory with its word-level tokenizers.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sam_mllm.config import load_config
from sam_mllm.data.synthetic import generate
from sam_mllm.models import build_model
from sam_mllm.models.backbone import export_backbone
from sam_mllm.train import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="sam_mllm/assets/tiny_backbone")
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/demo/pretrain_backbone.yaml")
    args = p.parse_args()
    cfg = load_config("demo/pretrain_backbone", args.overrides)
    start = time.monotonic()
    generate(Path(cfg.data_root), seed=cfg.seed, datasets=["pretrain"])
    final = train(cfg)
    torch.manual_seed(cfg.seed)  # the same random initialisation for the parts training did not touch
    cfg.model.checkpoint = str(final)
    model = build_model(cfg.model)
    out = export_backbone(model, args.out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported {out} ({size / 2**20:.1f} MiB) in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()

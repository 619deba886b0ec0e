"""Reproduce the embedded tiny backbone (sam_mllm/assets/tiny_backbone) from scratch.

    python scripts/pretrain_tiny_backbone.py [--out sam_mllm/assets/tiny_backbone]
        [--stage1 DIR] [key=value ...]

1. stage 1 (BLIP-2-style pre-training): generates the synthetic world's single-image ``pretrain``
   split (seed 0) and trains an InstructBLIP-shaped model of the `demo` dimensions with every
   weight trainable (configs/demo/pretrain_backbone.yaml, through the ordinary training recipe);
2. stage 2 (instruction tuning): generates the ``instruct`` split (eleven tasks in many phrasings,
   sam_mllm.data.instructions) and trains on from the stage-1 weights
   (configs/demo/instruct_backbone.yaml);
3. exports the result as a Hugging Face InstructBLIP directory with its word-level tokenizers.

``--stage1 DIR`` starts stage 2 from an existing stage-1 backbone directory (the backbone committed
before instruction tuning was added is exactly stage 1's output) instead of training stage 1 again.
``key=value`` overrides apply to stage 2's config. Held-in/held-out accuracy of the result:
``python scripts/backbone_report.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sam_mllm.config import load_config
from sam_mllm.data.synthetic import DEFAULT_SIZES, generate
from sam_mllm.models import build_model, load_trainable, save_trainable
from sam_mllm.models.backbone import export_backbone
from sam_mllm.train import train

ALL = ["vision_model", "query_tokens", "qformer", "language_projection", "language_model"]


def ensure_split(data_root: Path, seed: int, dataset: str) -> None:
    """Generate ``dataset`` unless ``data_root`` already holds it for this seed (a rerun resumes)."""
    manifest = data_root / "manifest.json"
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        if found.get("seed") == seed and found["counts"].get(dataset) == DEFAULT_SIZES[dataset]:
            return
    generate(data_root, seed=seed, datasets=[dataset])


def stage1_weights(stage1: str | None, overrides: list[str]) -> Path:
    """Stage 1's weights as an adapter file of every parameter (what model.checkpoint loads)."""
    cfg = load_config("demo/pretrain_backbone", [o for o in overrides if o.startswith(("data_root=", "seed="))])
    if stage1 is None:
        ensure_split(Path(cfg.data_root), cfg.seed, "pretrain")
        return train(cfg)
    cfg.model.dims, cfg.model.backbone = None, stage1
    model = build_model(cfg.model)
    return save_trainable(model, Path(cfg.output_dir) / "from_stage1_dir")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="sam_mllm/assets/tiny_backbone")
    p.add_argument("--stage1", default=None, help="existing stage-1 backbone directory (skips stage 1)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/demo/instruct_backbone.yaml")
    args = p.parse_args()
    start = time.monotonic()
    weights = stage1_weights(args.stage1, args.overrides)
    print(f"stage 1 weights: {weights} ({time.monotonic() - start:.0f} s)")
    cfg = load_config("demo/instruct_backbone", args.overrides)
    cfg.model.checkpoint = str(weights)
    ensure_split(Path(cfg.data_root), cfg.seed, "instruct")
    final = train(cfg)
    torch.manual_seed(cfg.seed)  # the same random initialisation for the parts training did not touch
    cfg.model.trainable = ALL  # stage 1's weights (all of them), then what stage 2 trained on top
    model = build_model(cfg.model)
    load_trainable(model, final)
    out = export_backbone(model, args.out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported {out} ({size / 2**20:.1f} MiB) in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()

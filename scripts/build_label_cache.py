"""Label every training image of a config with its SEA patch labeller, into the label cache.

    python scripts/build_label_cache.py --config configs/train/sea_instructblip.yaml [key=value ...]

Training builds the same cache on its first run (``sea.enabled=true``); building it ahead lets a
CLIP labeller run once on a GPU machine and the cache be copied. The cache folder is keyed by the
labeller's fingerprint and the image transform's, so a changed labeller, word list or transform
never reads stale labels.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from sam_mllm.config import ConfigError, load_config
from sam_mllm.data.processing import ImageTransform
from sam_mllm.objectives.labellers import LabellerError, build_label_cache, build_labeller


def backbone_grid(cfg) -> tuple[int, int]:
    """(image size, patch grid) of the configured backbone, without loading its weights."""
    from transformers import InstructBlipConfig

    from sam_mllm.models.backbone import _locate, instructblip_config, resolve_dims

    if cfg.model.dims is not None:
        vc = instructblip_config(resolve_dims(cfg.model.dims)).vision_config
    else:
        vc = InstructBlipConfig.from_pretrained(_locate(cfg.model.backbone)).vision_config
    return vc.image_size, vc.image_size // vc.patch_size


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from sam_mllm.train import load_train_sets

        sets, _ = load_train_sets(cfg)
        size, grid = backbone_grid(cfg)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        labeller = build_labeller(cfg.sea, grid, device, cfg.data.image_mode)
        files = [root / f for root, samples in sets for s in samples for f in s.img_list]
        start = time.monotonic()
        cache, added = build_label_cache(cfg.sea.label_cache, labeller, ImageTransform(size), files, args.batch_size)
    except (ConfigError, LabellerError, OSError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    print(f"label cache {cache.dir}: {added} images labelled in {time.monotonic() - start:.1f} s, "
          f"{len(cache.index['rows'])} cached ({labeller.fingerprint}, {len(labeller.words)} words)")


if __name__ == "__main__":
    main()

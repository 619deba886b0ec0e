"""Patch-label precision of a CLIP labeller against the synthetic world's oracle labeller.

    python scripts/label_precision.py [--clip sam_mllm/assets/tiny_clip] [--images 100] [--top-n 10]
        [--dataset pretrain | --split FOLDER]

On held-out synthetic images (by default the ``test`` split of ``--dataset`` (pretrain), seed 0,
generated if missing: scripts/pretrain_tiny_clip.py trains on ``pretrain/train`` only; ``mmlink``
has 2-4 objects per image), every patch's top-n CLIP labels
(Eq. 6, with the paper's negated similarity and without) are compared with the words the oracle has
on that patch (positive visible area). Prints precision@1 and precision@n over all patches and over
object patches (more object than background), with the chance level and the best possible value.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sam_mllm.models.backbone import TINY_BACKBONE
from sam_mllm.objectives.labellers import LabellerError, precision_table, saved_patch_grid, world_label_words


def held_out_split(dataset: str, seed: int, images: int, root: Path) -> Path:
    """The ``test`` split of ``dataset`` and ``seed`` with at least ``images`` images (generated if missing)."""
    from sam_mllm.data.synthetic import generate

    split = root / dataset / "test"
    if len(list((split / "images").glob("*.png"))) < images:
        generate(root, seed=seed, datasets=[dataset], sizes={dataset: {"train": 0, "val": 0, "test": images}},
                 workers=1)
    return split


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clip", default="sam_mllm/assets/tiny_clip", help="CLIP folder or Hugging Face id")
    p.add_argument("--split", default=None, help="a synthetic split folder (scenes.json + images/)")
    p.add_argument("--dataset", default="pretrain", help="synthetic dataset whose test split is measured")
    p.add_argument("--data", default="runs/tiny_clip/heldout", help="where --split is generated when not given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--top-n", type=int, default=10)
    args = p.parse_args(argv)
    start = time.monotonic()
    grid = saved_patch_grid(TINY_BACKBONE)  # the backbone's patch grid; the CLIP must match it
    split = Path(args.split) if args.split else held_out_split(args.dataset, args.seed, args.images,
                                                                      Path(args.data))
    files = sorted((split / "images").glob("*.png"))[: args.images]
    if not files:
        sys.exit(f"error: no images in {split / 'images'}")
    try:
        table = precision_table(args.clip, files, grid, args.top_n)
    except LabellerError as exc:
        sys.exit(f"error: {exc}")
    print(f"{args.clip} on {len(files)} images of {split} ({grid}x{grid} patches, {len(world_label_words())} words)")
    print(table)
    print(f"measured in {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main()

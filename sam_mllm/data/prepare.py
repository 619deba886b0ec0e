"""``python -m sam_mllm.data.prepare DATASET --src DIR --out DIR`` — a benchmark's original release
to ``annotations.json`` in the sample schema (images stay where they are; paths are relative).

DATASET is one of: vist, aesop, clevr_change, spot_the_diff, birds_to_words, iedit, nico, demon,
passthrough (the SAM authors' converted Conceptual / DM800K / AESOP / VIST folders).
"""

from __future__ import annotations

import inspect
import sys
import warnings
from pathlib import Path

from sam_mllm import cli
from sam_mllm.data.convert import CONVERTERS
from sam_mllm.data.schema import DataError, read_annotations, write_annotations


def _flag(option: str) -> str:
    return "--no-nonsemantic" if option == "nonsemantic" else "--" + option.replace("_", "-")


def prepare(dataset: str, src: Path, out: Path, **options) -> Path:
    """Convert ``dataset`` from ``src`` into ``out/annotations.json``; ``options`` are the converter's
    own keyword arguments (an option the converter does not use is an error, not silently ignored)."""
    if dataset not in CONVERTERS:
        raise DataError(f"unknown dataset {dataset!r}; converters: {', '.join(CONVERTERS)}")
    converter = CONVERTERS[dataset]
    accepted = set(inspect.signature(converter).parameters) - {"src", "out"}
    unused = sorted(set(options) - accepted)
    if unused:
        usable = ", ".join(_flag(o) for o in sorted(accepted)) or "none"
        raise DataError(f"{dataset} does not use {', '.join(_flag(o) for o in unused)} (its options: {usable})")
    if not src.exists():
        raise DataError(f"--src {src} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    samples = converter(src, out, **options)
    if not samples:
        raise DataError(f"{dataset}: no samples converted from {src} (split {options.get('split')!r})")
    path = write_annotations(samples, out / "annotations.json")
    read_annotations(path, check_images=False)  # what we wrote must read back cleanly
    return path


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    p = cli.parser("sam_mllm.data.prepare", __doc__)
    p.add_argument("dataset", choices=sorted(CONVERTERS))
    p.add_argument("--src", required=True, type=Path, help="the release folder (or the .tsv for birds_to_words)")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write annotations.json into")
    p.add_argument("--split", default=None, help="default: test (core for demon)")
    p.add_argument("--images", type=Path, default=None,
                   help="spot_the_diff, birds_to_words, iedit: the image folder, where the release keeps it apart")
    p.add_argument("--image-map", type=Path, default=None, help="birds_to_words: JSON {url: local file}")
    p.add_argument("--group-size", type=int, default=None, help="nico: images per group (default 5)")
    p.add_argument("--superclass", default=None, help="nico: Animal or Vehicle")
    p.add_argument("--demon-dataset", default=None, help="demon: dataset folder name, e.g. VIST")
    p.add_argument("--seed", type=int, default=None, help="nico: grouping seed (default 0)")
    p.add_argument("--no-nonsemantic", action="store_true", help="clevr_change: leave out no-change pairs")
    p.add_argument("--skip-missing", action="store_true", help="drop (and list) samples whose images are missing")
    args = p.parse_args(argv)
    # Only what the user gave reaches the converter, so an option it does not use is reported.
    given = dict(split=args.split, images=args.images, image_map=args.image_map, group_size=args.group_size,
                 superclass=args.superclass, demon_dataset=args.demon_dataset, seed=args.seed,
                 nonsemantic=False if args.no_nonsemantic else None,
                 skip_missing=True if args.skip_missing else None)
    options = {k: v for k, v in given.items() if v is not None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = prepare(args.dataset, args.src, args.out, **options)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    samples, _ = read_annotations(path, check_images=False)
    refs = sum(len(s.all_references) for s in samples) / len(samples)
    images = sum(len(s.img_list) for s in samples)
    print(f"{path}: {len(samples)} samples, {images} images, {refs:.2f} references per sample")


if __name__ == "__main__":
    main()

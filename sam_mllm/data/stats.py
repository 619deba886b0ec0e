"""``python -m sam_mllm.data.stats DIR... [--no-images]`` — Table 1's columns for datasets in our schema.

One Markdown row per dataset folder (or ``annotations.json`` file): samples, images per sample,
distinct images, instruction and answer length in words, distinct instructions, answer vocabulary,
and how alike the images of a sample are. The last is the cheap proxy of Table 1's "images in a group
with distinct contexts": the mean, over samples, of the mean pairwise Pearson correlation of the
images' 32x32 grey-level thumbnails (near 1 for Spot-the-Diff-like pairs of one scene, near 0 for
unrelated scenes). It reads every image once, so ``--similarity-samples N`` limits it to the first N
samples of each dataset, and ``--no-images`` skips it.
"""

from __future__ import annotations

import itertools
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sam_mllm import cli
from sam_mllm.data.processing import load_image
from sam_mllm.data.schema import Sample, read_annotations

_WORD = re.compile(r"[\w']+")
THUMB = 32


@dataclass
class DatasetStats:
    name: str
    samples: int
    images_mean: float
    images_min: int
    images_max: int
    distinct_images: int
    instruction_words: float
    distinct_instructions: int
    answer_words: float
    answer_vocabulary: int
    image_similarity: float | None = None  # mean pairwise thumbnail correlation; None when not computed
    similarity_samples: int = 0  # samples with >= 2 images the similarity averages over


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _thumbnail(path: Path, where: str) -> np.ndarray:
    im = load_image(path, where).convert("L").resize((THUMB, THUMB))
    x = np.asarray(im, dtype=np.float64).ravel()
    x = x - x.mean()
    norm = np.linalg.norm(x)
    return x / norm if norm > 0 else x  # a flat image correlates 0 with everything


def image_similarity(samples: Sequence[Sample], root: Path, limit: int | None = None) -> tuple[float | None, int]:
    """(mean over samples of the mean pairwise thumbnail correlation, samples used)."""
    chosen = [s for s in samples if len(s.img_list) > 1][:limit]
    per_sample = []
    cache: dict[str, np.ndarray] = {}
    for s in tqdm(chosen, desc=f"similarity {root.name}", unit="sample", disable=len(chosen) < 200):
        thumbs = []
        for rel in s.img_list:
            if rel not in cache:
                cache[rel] = _thumbnail(root / rel, f"sample id {s.id!r}: ")
            thumbs.append(cache[rel])
        per_sample.append(statistics.fmean(float(a @ b) for a, b in itertools.combinations(thumbs, 2)))
    return (statistics.fmean(per_sample) if per_sample else None), len(per_sample)


def dataset_stats(path: str | Path, images: bool = True, similarity_samples: int | None = None) -> DatasetStats:
    """Statistics of one dataset folder (holding ``annotations.json``) or annotations file."""
    path = Path(path)
    annotations = path / "annotations.json" if path.is_dir() else path
    samples, _ = read_annotations(annotations, check_images=False)
    counts = [len(s.img_list) for s in samples]
    answers = [r for s in samples for r in s.all_references]
    vocab = {w for a in answers for w in words(a)}
    stats = DatasetStats(
        name=path.name if path.is_dir() else path.parent.name,
        samples=len(samples),
        images_mean=statistics.fmean(counts), images_min=min(counts), images_max=max(counts),
        distinct_images=len({p for s in samples for p in s.img_list}),
        instruction_words=statistics.fmean(len(words(s.instruction)) for s in samples),
        distinct_instructions=len({s.instruction for s in samples}),
        answer_words=statistics.fmean(len(words(a)) for a in answers),
        answer_vocabulary=len(vocab),
    )
    if images:
        stats.image_similarity, stats.similarity_samples = image_similarity(
            samples, annotations.parent, similarity_samples)
    return stats


COLUMNS = ("dataset", "samples", "images / sample (min–max)", "distinct images", "instruction words",
           "distinct instructions", "answer words", "answer vocabulary", "image-pair similarity")


def to_markdown(rows: Sequence[DatasetStats]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        sim = "–" if r.image_similarity is None else f"{r.image_similarity:.2f} (n={r.similarity_samples})"
        cells = [r.name, f"{r.samples:,}", f"{r.images_mean:.2f} ({r.images_min}–{r.images_max})",
                 f"{r.distinct_images:,}", f"{r.instruction_words:.1f}", f"{r.distinct_instructions:,}",
                 f"{r.answer_words:.1f}", f"{r.answer_vocabulary:,}", sim]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    p = cli.parser("sam_mllm.data.stats", __doc__)
    p.add_argument("datasets", nargs="+", help="dataset folders (holding annotations.json) or annotations files")
    p.add_argument("--no-images", action="store_true", help="skip the image-pair similarity (reads no image)")
    p.add_argument("--similarity-samples", type=int, default=None,
                   help="compute the similarity on the first N multi-image samples of each dataset")
    p.add_argument("--out", help="also write the Markdown table to this file")
    args = p.parse_args(argv)
    # DataError and ImageLoadError name the file and the sample; cli.entry_point prints them in one line.
    rows = [dataset_stats(d, not args.no_images, args.similarity_samples) for d in args.datasets]
    text = to_markdown(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""A procedural multi-image world in the spirit of the paper's MmLINK pipeline (its §3), at toy scale.

Step 1 places one main object (shape, colour, pattern; varied pose, size and position) together
with distinct distractor objects on canvases; step 2 fills each canvas with a different context
(grass, sea, sand, brick, wood, night, snow, sky). From these scenes come, in the sample schema:

- ``mmlink``: image pairs sharing one object in two contexts -> name the shared object (training);
- ``group_captioning``: 2-5 images sharing one object among distractors -> the shared object;
- ``storytelling``: one character across 3-5 contexts, captions for all but the last image;
- ``change_captioning``: two near-identical images with one change (added, removed, moved,
  recoloured) -> the change;
- ``pretrain``: single images with captions and short questions (for the tiny backbone).

Every image holds several objects, so which one an instruction is about is only clear from the
other images. Output is a pure function of the seed: same seed, byte-identical files.

    python -m sam_mllm.data.synthetic --out data/synthetic [--seed 0] [--image-size 64]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm

VERSION = 1
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "heart")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (240, 210, 40),
           "purple": (150, 60, 200), "orange": (245, 140, 30), "pink": (245, 130, 190), "cyan": (40, 210, 220)}
PATTERNS = ("plain", "striped", "dotted", "checkered")
CONTEXTS = {"grass": "on the grass", "sea": "in the sea", "sand": "on the sand", "brick": "by a brick wall",
            "wood": "on a wooden floor", "night": "at night", "snow": "in the snow", "sky": "in the sky"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
DIRECTIONS = ("left", "right", "up", "down")

GROUP_INSTRUCTION = "Sum up the common factor in these {count} pictures in a single statement."
CHANGE_INSTRUCTION = "What's the difference between 2 images? {image#1}{image#2}Difference:"
STORY_INSTRUCTION = "Given the stories paired with the first several images, can you finish the story based on the last image?"
MMLINK_INSTRUCTIONS = ("What object appears in both images?", "Describe the object the two pictures share.",
                       "Which object can be seen in both pictures?", "Name the thing that is in every image.")
# ``mmlink_instructions="diverse"``: sixteen phrasings of MmLINK's question, written only with words
# of the fixed vocabulary (the committed backbone's tokenisers) and without the group-captioning
# template's own words ("sum", "common", "factor", "statement"), so that task stays zero-shot.
MMLINK_INSTRUCTIONS_DIVERSE = MMLINK_INSTRUCTIONS + (
    "What thing is in every picture?", "Which object can be seen in these two images?",
    "Name the object that appears in every picture.", "What object can be seen in these two pictures?",
    "Describe the thing these images share.", "Which thing appears in both images?",
    "What is the object in every image?", "Name the object that can be seen in both images.",
    "Describe the object that is in these two images.", "Which object is in every image?",
    "Write the name of the object the images share.", "Describe the thing that can be seen in every image.")
MMLINK_INSTRUCTION_SETS = {"fixed": MMLINK_INSTRUCTIONS, "diverse": MMLINK_INSTRUCTIONS_DIVERSE}
STORY_CAPTIONS = ("the {obj} is {ctx}.", "now the {obj} is {ctx}.", "then the {obj} goes {ctx}.",
                  "later the {obj} rests {ctx}.")
PRETRAIN_QUESTIONS = ("Describe the image.", "What is the colour of the {shape}?", "What shape is {colour}?",
                      "What is the background?", "How many objects are there?", "Is there a {name}?")

DEFAULT_SIZES: dict[str, dict[str, int]] = {
    "mmlink": {"train": 1200, "val": 50, "test": 100},
    "group_captioning": {"train": 100, "val": 50, "test": 100},
    "storytelling": {"train": 100, "val": 50, "test": 100},
    "change_captioning": {"train": 100, "val": 50, "test": 100},
    "pretrain": {"train": 12000, "val": 100, "test": 100},
}
DATASETS = tuple(DEFAULT_SIZES)
SPLITS = ("train", "val", "test")

_TOKEN = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]")


def tokenize_words(text: str) -> list[str]:
    """The word rule of the synthetic world's tokenisers: lower case; letters form words; every digit
    and every punctuation character is a token of its own; whitespace separates."""
    return _TOKEN.findall(text.lower())


def object_name(shape: str, colour: str, pattern: str) -> str:
    return f"{colour} {shape}" if pattern == "plain" else f"{colour} {pattern} {shape}"


def vocabulary() -> list[str]:
    """Every token the generator can emit, in a stable order (tokenisers are built from it)."""
    texts = [GROUP_INSTRUCTION, CHANGE_INSTRUCTION, STORY_INSTRUCTION, *MMLINK_INSTRUCTIONS, *STORY_CAPTIONS,
             *PRETRAIN_QUESTIONS, "Caption#: a the and was added removed moved to turned yes no",
             " ".join(SHAPES), " ".join(COLOURS), " ".join(PATTERNS), " ".join(CONTEXTS.values()),
             " ".join(CONTEXTS), " ".join(NUMBER_WORDS), " ".join(DIRECTIONS), "0 1 2 3 4 5 6 7 8 9 , ."]
    from sam_mllm.tasks import STORY_TEMPLATES

    texts += list(STORY_TEMPLATES) + list(MMLINK_INSTRUCTIONS_DIVERSE)  # last: adds no word, keeps the order
    seen: dict[str, None] = {}
    for t in texts:
        for w in tokenize_words(t.replace("{", " { ").replace("}", " } ")):
            seen.setdefault(w, None)
    return list(seen)


# ------------------------------------------------------------------------------------------ drawing

def _shape_polygon(shape: str, r: float, c: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        k = r * 0.8
        return [(c - k, c - k), (c + k, c - k), (c + k, c + k), (c - k, c + k)]
    if shape == "triangle":
        return [(c, c - r), (c + r * 0.95, c + r * 0.75), (c - r * 0.95, c + r * 0.75)]
    if shape == "diamond":
        return [(c, c - r), (c + r * 0.6, c), (c, c + r), (c - r * 0.6, c)]
    if shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rad = r if i % 2 == 0 else r * 0.45
            pts.append((c + rad * math.cos(a), c + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.35
        return [(c - w, c - r), (c + w, c - r), (c + w, c - w), (c + r, c - w), (c + r, c + w), (c + w, c + w),
                (c + w, c + r), (c - w, c + r), (c - w, c + w), (c - r, c + w), (c - r, c - w), (c - w, c - w)]
    if shape == "heart":
        pts = []
        for i in range(40):
            t = 2 * math.pi * i / 40
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((c + x * r / 17, c - y * r / 17 - r * 0.1))
        return pts
    return None


def render_object(shape: str, colour: str, pattern: str, size: int, angle: float) -> Image.Image:
    """RGBA sprite of one object with its own mask (alpha) and a dark outline."""
    s = size * 2  # drawn at 2x, then rotated and reduced: smooth edges at small sizes
    mask = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(mask)
    r, c = s * 0.46, s / 2
    if shape in ("circle", "ring"):
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
        if shape == "ring":
            draw.ellipse([c - r * 0.5, c - r * 0.5, c + r * 0.5, c + r * 0.5], fill=0)
    else:
        draw.polygon(_shape_polygon(shape, r, c), fill=255)
    yy, xx = np.mgrid[0:s, 0:s]
    period = max(4, s // 5) // 2 * 2
    if pattern == "striped":
        light = (xx // (period // 2)) % 2 == 1
    elif pattern == "dotted":
        light = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period * 0.22) ** 2
    elif pattern == "checkered":
        light = ((xx // period) + (yy // period)) % 2 == 1
    else:
        light = np.zeros((s, s), dtype=bool)
    rgb = np.empty((s, s, 3), dtype=np.uint8)
    rgb[:] = COLOURS[colour]
    rgb[light] = (250, 250, 250)
    sprite = Image.fromarray(rgb).convert("RGBA")
    outline = mask.filter(ImageFilter.MaxFilter(5))
    dark = Image.new("RGBA", (s, s), (20, 20, 20, 255))
    body = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    body.paste(dark, (0, 0), outline)
    body.paste(sprite, (0, 0), mask)
    body = body.rotate(angle, resample=Image.BICUBIC)
    return body.resize((size, size), Image.BILINEAR)


def render_background(context: str, size: int, rng: np.random.Generator) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    noise = rng.normal(0, 1, (size, size)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)

    def colour(base, spread, field):
        return np.clip(np.array(base, np.float32)[None, None] + spread * field[..., None], 0, 255)

    if context == "grass":
        img = colour((70, 140, 60), 25, noise + np.sin(xx * 60 + phase) * 0.8)
    elif context == "sea":
        img = colour((40, 90, 160), 30, np.sin(yy * 40 + np.sin(xx * 12 + phase) * 2) + 0.3 * noise)
    elif context == "sand":
        img = colour((215, 190, 140), 12, noise)
    elif context == "brick":
        rows = (yy * 8).astype(int)
        mortar = ((yy * 8) % 1 < 0.12) | (((xx * 4 + 0.5 * (rows % 2)) % 1) < 0.06)
        img = colour((160, 70, 50), 10, noise)
        img[mortar] = (200, 200, 190)
    elif context == "wood":
        img = colour((140, 95, 55), 25, np.sin(xx * 50 + np.sin(yy * 6 + phase) * 3) + 0.2 * noise)
    elif context == "night":
        img = colour((15, 20, 50), 6, noise)
        stars = rng.random((size, size)) < 0.02
        img[stars] = (240, 240, 255)
    elif context == "snow":
        img = colour((235, 238, 245), 10, noise)
    else:  # sky
        img = colour((120, 180, 235), 8, noise) + (yy * 40)[..., None]
        cy, cx = rng.uniform(0.2, 0.8, 2)
        cloud = ((xx - cx) ** 2 / 0.04 + (yy - cy) ** 2 / 0.01) < 1
        img[cloud] = (245, 245, 250)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------- scenes

class _World:
    """Draws objects and scenes from one random generator."""

    def __init__(self, rng: np.random.Generator, image_size: int, mmlink_instructions: str = "fixed",
                 phrasing: np.random.Generator | None = None) -> None:
        self.rng, self.size = rng, image_size
        # The diverse phrasings come from their own generator, so the scenes stay byte-identical
        # to the fixed world's and the two instruction sets compare on the same images.
        self.mmlink_instructions, self.phrasing = mmlink_instructions, phrasing

    def obj(self, unlike: Iterable[tuple[str, str, str]] = (),
            unused: set[tuple[str, str, str]] = frozenset()) -> tuple[str, str, str]:
        """An object whose shape and colour both differ from those of ``unlike`` (the objects it
        shares an image with: nothing is ambiguous) and that is not one of ``unused`` (the other
        images' distractors: only the main object is common to all images)."""
        unlike = list(unlike)
        while True:
            o = (SHAPES[self.rng.integers(len(SHAPES))], list(COLOURS)[self.rng.integers(len(COLOURS))],
                 PATTERNS[self.rng.integers(len(PATTERNS))])
            if o not in unused and all(o[0] != e[0] and o[1] != e[1] for e in unlike):
                return o

    def scene_objects(self, main: tuple[str, str, str], count: int,
                      used: set[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        """``main`` plus ``count`` distractors, in random order; ``used`` collects the distractors."""
        objs = [main]
        for _ in range(count):
            objs.append(self.obj(objs, used))
            used.add(objs[-1])
        return [objs[j] for j in self.rng.permutation(len(objs))]

    def place(self, objects: list[tuple[str, str, str]]) -> list[dict]:
        """Positions and poses for ``objects`` without large overlaps."""
        s = self.size
        placed: list[dict] = []
        for o in objects:
            for _ in range(200):
                d = int(self.rng.integers(int(s * 0.26), int(s * 0.38) + 1))
                x, y = (int(v) for v in self.rng.integers(0, s - d + 1, 2))
                if all(abs(x - p["x"]) * 1.0 >= (d + p["d"]) * 0.45 or abs(y - p["y"]) >= (d + p["d"]) * 0.45
                       for p in placed):
                    break
            placed.append({"obj": o, "x": x, "y": y, "d": d, "angle": float(self.rng.uniform(-40, 40))})
        return placed

    def draw(self, context: str, placed: list[dict], bg_seed: int) -> Image.Image:
        canvas = render_background(context, self.size, np.random.default_rng(bg_seed)).convert("RGBA")
        for p in placed:
            sprite = render_object(*p["obj"], p["d"], p["angle"])
            canvas.alpha_composite(sprite, (p["x"], p["y"]))
        return canvas.convert("RGB")

    def contexts(self, n: int) -> list[str]:
        return [list(CONTEXTS)[i] for i in self.rng.permutation(len(CONTEXTS))[:n]]

    def bg_seed(self) -> int:
        return int(self.rng.integers(2**31))


def _name(o: tuple[str, str, str]) -> str:
    return object_name(*o)


def _sample_mmlink(w: _World, i: int) -> tuple[dict, list[Image.Image]]:
    main, used = w.obj(), set()
    images = [w.draw(ctx, w.place(w.scene_objects(main, int(w.rng.integers(1, 4)), used)), w.bg_seed())
              for ctx in w.contexts(2)]
    instruction = MMLINK_INSTRUCTIONS[int(w.rng.integers(len(MMLINK_INSTRUCTIONS)))]
    if w.mmlink_instructions == "diverse":
        instruction = MMLINK_INSTRUCTIONS_DIVERSE[int(w.phrasing.integers(len(MMLINK_INSTRUCTIONS_DIVERSE)))]
    return {"instruction": instruction, "output": f"a {_name(main)}"}, images


def _sample_group(w: _World, i: int) -> tuple[dict, list[Image.Image]]:
    n = int(w.rng.integers(2, 6))
    main, used = w.obj(), set()
    images = [w.draw(ctx, w.place(w.scene_objects(main, int(w.rng.integers(1, 4)), used)), w.bg_seed())
              for ctx in w.contexts(n)]
    return {"instruction": GROUP_INSTRUCTION.format(count=NUMBER_WORDS[n]), "output": f"a {_name(main)}"}, images


def _sample_story(w: _World, i: int) -> tuple[dict, list[Image.Image]]:
    n = int(w.rng.integers(3, 6))
    main, used = w.obj(), set()
    images, captions = [], []
    for ctx in w.contexts(n):
        images.append(w.draw(ctx, w.place(w.scene_objects(main, int(w.rng.integers(1, 3)), used)), w.bg_seed()))
        template = STORY_CAPTIONS[int(w.rng.integers(len(STORY_CAPTIONS)))]
        captions.append(template.format(obj=_name(main), ctx=CONTEXTS[ctx]))
    context = "".join(f"{{image#{k + 1}}}Caption#{k + 1}:{captions[k]}" for k in range(n - 1))
    context += f"{{image#{n}}}Caption#{n}:"
    return {"instruction": STORY_INSTRUCTION + " " + context, "output": captions[-1]}, images


def _sample_change(w: _World, i: int) -> tuple[dict, list[Image.Image]]:
    ctx = w.contexts(1)[0]
    objs = w.scene_objects(w.obj(), int(w.rng.integers(1, 3)), set())
    kind = ("added", "removed", "moved", "recoloured")[int(w.rng.integers(4))]
    extra = w.obj(objs) if kind == "added" else None
    placed = w.place(objs + ([extra] if extra else []))
    bg = w.bg_seed()
    target = placed[-1] if kind == "added" else placed[int(w.rng.integers(len(objs)))]
    if kind == "added":
        before, after = placed[:-1], placed
        text = f"the {_name(extra)} was added."
    elif kind == "removed":
        before, after = placed, [p for p in placed if p is not target]
        text = f"the {_name(target['obj'])} was removed."
    elif kind == "moved":
        direction = DIRECTIONS[int(w.rng.integers(4))]
        step = int(w.size * 0.3)
        dx, dy = {"left": (-step, 0), "right": (step, 0), "up": (0, -step), "down": (0, step)}[direction]
        moved = dict(target, x=int(np.clip(target["x"] + dx, 0, w.size - target["d"])),
                     y=int(np.clip(target["y"] + dy, 0, w.size - target["d"])))
        if (moved["x"], moved["y"]) == (target["x"], target["y"]) or abs(moved["x"] - target["x"]) + abs(
                moved["y"] - target["y"]) < step // 2:
            direction = {"left": "right", "right": "left", "up": "down", "down": "up"}[direction]
            moved = dict(target, x=int(np.clip(target["x"] - dx, 0, w.size - target["d"])),
                         y=int(np.clip(target["y"] - dy, 0, w.size - target["d"])))
        before, after = placed, [moved if p is target else p for p in placed]
        text = f"the {_name(target['obj'])} moved to the {direction}." if direction in ("left", "right") else \
            f"the {_name(target['obj'])} moved {direction}."
    else:
        shape, colour, pattern = target["obj"]
        new = [c for c in COLOURS if c != colour and all(c != o[1] for o in objs)][
            int(w.rng.integers(len(COLOURS) - len(objs)))]
        after = [dict(p, obj=(shape, new, pattern)) if p is target else p for p in placed]
        before = placed
        text = f"the {_name(target['obj'])} turned {new}."
    return {"instruction": CHANGE_INSTRUCTION, "output": text}, [w.draw(ctx, before, bg), w.draw(ctx, after, bg)]


def _sample_pretrain(w: _World, i: int) -> tuple[dict, list[Image.Image]]:
    ctx = w.contexts(1)[0]
    objs = w.scene_objects(w.obj(), int(w.rng.integers(0, 3)), set())
    placed = w.place(objs)
    image = w.draw(ctx, placed, w.bg_seed())
    left_to_right = [_name(p["obj"]) for p in sorted(placed, key=lambda p: p["x"])]
    kind = int(w.rng.integers(len(PRETRAIN_QUESTIONS)))
    target = objs[int(w.rng.integers(len(objs)))]
    if kind == 0:
        listing = left_to_right[0] if len(objs) == 1 else \
            ", ".join(f"a {n}" for n in left_to_right[:-1]) + f" and a {left_to_right[-1]}"
        if len(objs) == 1:
            listing = f"a {listing}"
        q, a = PRETRAIN_QUESTIONS[0], f"{listing} {CONTEXTS[ctx]}."
    elif kind == 1:
        q, a = PRETRAIN_QUESTIONS[1].format(shape=target[0]), f"{target[1]}."
    elif kind == 2:
        q, a = PRETRAIN_QUESTIONS[2].format(colour=target[1]), f"{target[0]}."
    elif kind == 3:
        q, a = PRETRAIN_QUESTIONS[3], f"{ctx}."
    elif kind == 4:
        q, a = PRETRAIN_QUESTIONS[4], f"{NUMBER_WORDS[len(objs)]}."
    else:
        asked = target if w.rng.random() < 0.5 else w.obj(unused=set(objs))
        q, a = PRETRAIN_QUESTIONS[5].format(name=_name(asked)), "yes." if asked in objs else "no."
    return {"instruction": q, "output": a}, [image]


_MAKERS = {"mmlink": _sample_mmlink, "group_captioning": _sample_group, "storytelling": _sample_story,
           "change_captioning": _sample_change, "pretrain": _sample_pretrain}


def _write_split(out: Path, d: str, split: str, n: int, seed: int, image_size: int,
                 mmlink_instructions: str = "fixed") -> int:
    # One generator per (seed, dataset, split): splits are independent, so they run in parallel
    # and the bytes do not depend on the number of workers.
    key = [seed, DATASETS.index(d), SPLITS.index(split)]
    world = _World(np.random.default_rng(key), image_size, mmlink_instructions, np.random.default_rng([*key, 1]))
    folder = out / d / split
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        record, images = _MAKERS[d](world, i)
        sid = f"{d}-{split}-{i:05d}"
        paths = []
        for k, im in enumerate(images):
            rel = f"images/{sid}_{k}.png"
            im.save(folder / rel, format="PNG")
            paths.append(rel)
        records.append({"id": sid, "img_list": paths, **record})
    (folder / "annotations.json").write_text(json.dumps(records, indent=1))
    return n


def generate(out_dir: str | Path, *, seed: int = 0, image_size: int = 64,
             sizes: dict[str, dict[str, int]] | None = None, datasets=None, workers: int | None = None,
             mmlink_instructions: str = "fixed") -> dict:
    """Write ``{out}/{dataset}/{split}/annotations.json`` + ``images/``; returns the manifest.

    ``datasets`` defaults to everything but ``pretrain`` (only the backbone's script needs it).
    ``mmlink_instructions``: ``fixed`` (four phrasings, the default world) or ``diverse`` (sixteen).
    """
    if mmlink_instructions not in MMLINK_INSTRUCTION_SETS:
        raise ValueError(f"mmlink_instructions={mmlink_instructions!r}; choose from {', '.join(MMLINK_INSTRUCTION_SETS)}")
    out = Path(out_dir)
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    chosen = list(datasets or [d for d in DATASETS if d != "pretrain"])
    unknown = [d for d in chosen if d not in _MAKERS]
    if unknown:
        raise ValueError(f"unknown synthetic dataset(s) {unknown}; available: {', '.join(DATASETS)}")
    jobs = [(d, split, n) for d in chosen for split, n in sizes[d].items() if n > 0]
    jobs.sort(key=lambda j: -j[2])  # big splits first keeps the workers busy
    counts: dict[str, dict[str, int]] = {d: {} for d in chosen}
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    bar = tqdm(total=sum(n for *_, n in jobs), desc="synthetic", unit="sample")
    if workers <= 1:
        for d, split, n in jobs:
            counts[d][split] = _write_split(out, d, split, n, seed, image_size, mmlink_instructions)
            bar.update(n)
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = {pool.submit(_write_split, out, d, split, n, seed, image_size, mmlink_instructions): (d, split)
                       for d, split, n in jobs}
            for fut in as_completed(futures):
                d, split = futures[fut]
                counts[d][split] = fut.result()
                bar.update(counts[d][split])
    bar.close()
    counts = {d: {s: counts[d][s] for s in SPLITS if s in counts[d]} for d in chosen}
    manifest = {"generator_version": VERSION, "seed": seed, "image_size": image_size, "counts": counts}
    if mmlink_instructions != "fixed":  # the default world's manifest stays as it was
        manifest["mmlink_instructions"] = mmlink_instructions
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--datasets", default=",".join(d for d in DATASETS if d != "pretrain"),
                   help=f"comma-separated, from {', '.join(DATASETS)}")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU core)")
    p.add_argument("--mmlink-instructions", default="fixed", choices=list(MMLINK_INSTRUCTION_SETS),
                   help="phrasings of the MmLINK question: 4 (fixed) or 16 (diverse)")
    args = p.parse_args(argv)
    start = time.monotonic()
    manifest = generate(args.out, seed=args.seed, image_size=args.image_size, datasets=args.datasets.split(","),
                        workers=args.workers, mmlink_instructions=args.mmlink_instructions)
    print(json.dumps(manifest, indent=1))
    print(f"generated in {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main()

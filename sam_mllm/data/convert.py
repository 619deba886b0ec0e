"""Converters from each benchmark's original release to the sample schema.

Every converter takes the release folder (``src``) and the output dataset folder (``out``) and
returns :class:`Sample` objects whose ``img_list`` paths are relative to ``out`` (images are not
copied). Prompts are the benchmarks' DEMON templates (template 0) followed by their DEMON context
(``{image#k}`` markers stay literal text: the model puts all visual tokens first). Malformed input
is a :class:`DataError` naming the file and the record.

References come in two forms, so that both scoring protocols are available from one dataset:

- ``output`` is the paper's single reference, built as DEMON built the ``response`` of its
  ``core.json`` (which the SAM paper scored against): IEdit's ``sents``, a Spot-the-Diff record's
  ``sentences`` and CLEVR-Change's captions joined with ``". "`` as stored (no stripping, original
  order); Birds-to-Words' first description as stored (tokenised text, ``" . "`` between
  sentences). ``eval.references=paper`` scores against it.
- ``references`` holds every human reference separately (stripped, empty ones dropped):
  ``eval.references=all`` scores against all of them, the cleaner multi-reference alternative.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from sam_mllm.data.schema import DataError, Sample, read_annotations
from sam_mllm.tasks import NUMBER_WORDS, STORY_TEMPLATES

CHANGE_CONTEXT = "{image#1}{image#2}Difference:"
IEDIT_CONTEXT = "Source Image:{image#1} Target Image:{image#2}Instruction:"
INSTRUCTIONS = {
    "storytelling": STORY_TEMPLATES[0],
    "change_captioning": "What's the difference between 2 images? ",
    "birds_to_words": "What's the difference between 2 birds? ",
    "iedit": "Please give a editing Request to describe the transformation from the source image to the target image.",
    "group_captioning": "Sum up the common factor in these {count} pictures in a single statement.",
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".gif", ".bmp", ".webp")


def story_prompt(captions: list[str]) -> str:
    """DEMON storytelling prompt: captions of the first images, the last image left to tell."""
    n = len(captions) + 1
    context = "".join(f"{{image#{k + 1}}}Caption#{k + 1}:{c}" for k, c in enumerate(captions))
    return INSTRUCTIONS["storytelling"] + context + f"{{image#{n}}}Caption#{n}:"


def _load_json(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def _rel(out: Path, image: Path) -> str:
    return os.path.relpath(image.resolve(), out.resolve())


def _find_image(folder: Path, stem: str) -> Path | None:
    """``stem`` with any image extension (releases mix .jpg/.png/...)."""
    for ext in IMAGE_EXTENSIONS:
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


class _Missing:
    """Missing images: an error by default; with ``skip_missing`` the samples are dropped and listed."""

    def __init__(self, skip: bool, source: Path) -> None:
        self.skip, self.source, self.ids = skip, source, []

    def __call__(self, sid, what: str) -> None:
        if not self.skip:
            raise DataError(f"{self.source}: record {sid!r}: {what} (use --skip-missing to drop such samples)")
        self.ids.append(sid)

    def warn(self) -> None:
        if self.ids:
            warnings.warn(f"{self.source}: dropped {len(self.ids)} samples with missing images: {self.ids[:20]}",
                          stacklevel=3)


# DEMON's joiner of a record's several sentences into its one ``response`` (see the module docstring).
DEMON_JOINER = ". "


def _field(record: dict, key: str, source: Path, where: str):
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{source}: {where}: field '{key}' is missing")
    return record[key]


def convert_vist(src: Path, out: Path, split: str = "test", skip_missing: bool = False) -> list[Sample]:
    """VIST SIS: a story = the 5 annotations of one ``story_id`` in ``worker_arranged_photo_order``."""
    path = src / "sis" / f"{split}.story-in-sequence.json"
    data = _load_json(path)
    annotations = _field(data, "annotations", path, "top level")
    stories: OrderedDict[str, list[dict]] = OrderedDict()
    for i, entry in enumerate(annotations):
        if not isinstance(entry, list) or len(entry) != 1:
            raise DataError(f"{path}: annotations[{i}]: expected a one-element list")
        a = entry[0]
        sid = str(_field(a, "story_id", path, f"annotations[{i}]"))
        stories.setdefault(sid, []).append(a)
    images_dir = src / "images" / split
    missing = _Missing(skip_missing, path)
    samples = []
    for sid, parts in stories.items():
        parts.sort(key=lambda a: int(_field(a, "worker_arranged_photo_order", path, f"story {sid}")))
        if len(parts) != 5:
            raise DataError(f"{path}: story {sid!r} has {len(parts)} annotations, expected 5")
        images = [_find_image(images_dir, str(_field(a, "photo_flickr_id", path, f"story {sid}"))) for a in parts]
        if None in images:
            missing(sid, f"image {parts[images.index(None)]['photo_flickr_id']}.* not found in {images_dir}")
            continue
        texts = [str(_field(a, "original_text", path, f"story {sid}")).strip() for a in parts]
        samples.append(Sample(sid, tuple(_rel(out, p) for p in images), story_prompt(texts[:4]), texts[4]))
    missing.warn()
    return samples


def convert_aesop(src: Path, out: Path, split: str = "test", skip_missing: bool = False) -> list[Sample]:
    """AESOP: panels 1-2 with their texts as context, panel 3's text to write."""
    path = src / "data" / f"{split}.json"
    if not path.is_file() and (src / f"{split}.json").is_file():
        path = src / f"{split}.json"
    stories = _load_json(path)
    if not isinstance(stories, list):
        raise DataError(f"{path}: expected a list of stories")
    missing = _Missing(skip_missing, path)
    samples = []
    for i, story in enumerate(stories):
        sid = str(_field(story, "storyid", path, f"story #{i}"))
        texts = _field(story, "text", path, f"story {sid}")
        paths = _field(story, "image_path", path, f"story {sid}")
        if len(texts) != 3 or len(paths) != 3:
            raise DataError(f"{path}: story {sid!r}: expected 3 texts and 3 image paths")
        images = []
        for p in paths:
            candidate = src / p
            found = candidate if candidate.is_file() else _find_image(candidate.parent, candidate.stem)
            images.append(found)
        if None in images:
            missing(sid, f"panel image {paths[images.index(None)]} not found under {src}")
            continue
        texts = [t.strip() for t in texts]
        samples.append(Sample(sid, tuple(_rel(out, p) for p in images), story_prompt(texts[:2]), texts[2]))
    missing.warn()
    return samples


def convert_clevr_change(src: Path, out: Path, split: str = "test", nonsemantic: bool = True,
                         skip_missing: bool = False) -> list[Sample]:
    """CLEVR-Change: (before, after) pairs of the split, every caption a reference.

    ``splits.json`` holds image numbers N (the real one: up to 39999; only the 39,803 captioned
    renders are in it): the pair is ``images/CLEVR_default_N.png`` (6 digits) with
    ``sc_images/CLEVR_semantic_N.png`` for a semantic change, and with
    ``nsc_images/CLEVR_nonsemantic_N.png`` for a viewpoint-only distractor (included when
    ``no_change_captions.json`` exists and ``nonsemantic`` is true). Only the split's renders need
    to be on disk.
    """
    splits_path = src / "splits.json"
    splits = _load_json(splits_path)
    if split not in splits:
        raise DataError(f"{splits_path}: no split {split!r}; splits: {sorted(splits)}")
    change = _load_json(src / "change_captions.json")
    no_change = _load_json(src / "no_change_captions.json") if (
        nonsemantic and (src / "no_change_captions.json").is_file()) else None
    missing = _Missing(skip_missing, splits_path)
    prompt = INSTRUCTIONS["change_captioning"] + CHANGE_CONTEXT
    samples = []
    for number in splits[split]:
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise DataError(f"{splits_path}: split {split!r}: {number!r} is not an image number")
        num = f"{number:06d}"
        before = f"CLEVR_default_{num}.png"
        pairs = [(num, src / "sc_images" / f"CLEVR_semantic_{num}.png", change, "change_captions.json")]
        if no_change is not None:
            pairs.append((f"{num}_nsc", src / "nsc_images" / f"CLEVR_nonsemantic_{num}.png", no_change,
                          "no_change_captions.json"))
        for sid, after, captions, source in pairs:
            raw = captions.get(before)
            if not raw:
                raise DataError(f"{src / source}: image number {number}: no captions for {before}")
            absent = next((p for p in (src / "images" / before, after) if not p.is_file()), None)
            if absent is not None:
                missing(sid, f"image number {number}: {absent} not found")
                continue
            refs = tuple(r.strip() for r in raw if r.strip())
            samples.append(Sample(sid, (_rel(out, src / "images" / before), _rel(out, after)), prompt,
                                  DEMON_JOINER.join(raw), refs))
    missing.warn()
    return samples


SPOT_THE_DIFF_IMAGE_DIRS = ("resized_images", "images", "data/resized_images", "data/images")


def convert_spot_the_diff(src: Path, out: Path, split: str = "test", images: Path | None = None,
                          skip_missing: bool = False) -> list[Sample]:
    """Spot-the-Diff: one sample per ``img_id``; each annotator's record is one reference (its
    sentences joined with ". "). The paper reference (``output``) is the first record of the
    ``img_id`` in file order, joined as DEMON did. Records whose sentences are all empty (7 in
    test) cannot be scored (an empty reference): they are dropped with a warning naming them.
    Without ``images``, the images are looked for in ``resized_images/``, ``images/``,
    ``data/resized_images/`` (the release's README) and ``data/images/`` under ``src``."""
    path = src / "data" / "annotations" / f"{split}.json"
    if not path.is_file() and (src / f"{split}.json").is_file():
        path = src / f"{split}.json"
    records = _load_json(path)
    if images is not None:
        image_dir = images
    else:
        image_dir = next((src / d for d in SPOT_THE_DIFF_IMAGE_DIRS if (src / d).is_dir()), None)
        if image_dir is None:
            raise DataError(f"{src}: no image folder (looked for {', '.join(SPOT_THE_DIFF_IMAGE_DIRS)}); "
                            "give it with --images")
    grouped: OrderedDict[str, list[tuple[str, str]]] = OrderedDict()
    empty = []
    for i, r in enumerate(records):
        img_id = str(_field(r, "img_id", path, f"record #{i}"))
        sentences = _field(r, "sentences", path, f"record #{i} (img_id {img_id})")
        text = DEMON_JOINER.join(s.strip() for s in sentences if s.strip())
        grouped.setdefault(img_id, [])
        if text:
            grouped[img_id].append((DEMON_JOINER.join(sentences), text))
        else:
            empty.append(f"#{i} (img_id {img_id})")
    if empty:
        warnings.warn(f"{path}: {len(empty)} records have no sentence and are not used as references: {empty}",
                      stacklevel=2)
    missing = _Missing(skip_missing, path)
    prompt = INSTRUCTIONS["change_captioning"] + CHANGE_CONTEXT
    samples = []
    for img_id, refs in grouped.items():
        if not refs:
            continue  # listed above: every annotator left it empty
        a, b = _find_image(image_dir, img_id), _find_image(image_dir, f"{img_id}_2")
        if a is None or b is None:
            missing(img_id, f"images {img_id}.* / {img_id}_2.* not found in {image_dir}")
            continue
        samples.append(Sample(img_id, (_rel(out, a), _rel(out, b)), prompt, refs[0][0],
                              tuple(text for _, text in refs)))
    missing.warn()
    return samples


def convert_birds_to_words(src: Path, out: Path, split: str = "test", images: Path | None = None,
                           image_map: Path | None = None, skip_missing: bool = False) -> list[Sample]:
    """Birds-to-Words TSV: rows grouped by (img1ImgURL, img2ImgURL), up to 5 references; the paper
    reference (``output``) is the pair's first description as stored (DEMON's tokenised text).

    Images are not distributed: ``image_map`` (JSON {url: path}) or ``images`` (files named by the
    URL's last path component) says where each downloaded image is."""
    path = src if src.is_file() else src / "birds-to-words-v1.0.tsv"
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    mapping = _load_json(image_map) if image_map else None
    image_dir = images or (path.parent / "images")

    def locate(url: str) -> Path | None:
        if mapping is not None:
            p = mapping.get(url)
            return Path(p) if p and Path(p).is_file() else None
        p = image_dir / url.rstrip("/").split("/")[-1].split("?")[0]
        return p if p.is_file() else None

    groups: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
    first: dict[tuple[str, str], str] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        needed = {"img1ImgURL", "img2ImgURL", "split", "description"}
        if not needed <= set(reader.fieldnames or []):
            raise DataError(f"{path}: header lacks {sorted(needed - set(reader.fieldnames or []))}")
        for line, row in enumerate(reader, start=2):
            if row["split"] != split:
                continue
            if not row["description"] or not row["description"].strip():
                raise DataError(f"{path}: line {line}: empty description")
            pair = (row["img1ImgURL"], row["img2ImgURL"])
            first.setdefault(pair, row["description"])
            groups.setdefault(pair, []).append(row["description"].strip())
    out_dir = Path(out)
    missing = _Missing(skip_missing, path)
    prompt = INSTRUCTIONS["birds_to_words"] + CHANGE_CONTEXT
    samples = []
    for (u1, u2), refs in groups.items():
        sid = hashlib.sha1(f"{u1}|{u2}".encode()).hexdigest()[:12]
        a, b = locate(u1), locate(u2)
        if a is None or b is None:
            missing(sid, f"image for {u1 if a is None else u2} not found")
            continue
        samples.append(Sample(sid, (_rel(out_dir, a), _rel(out_dir, b)), prompt, first[(u1, u2)], tuple(refs[:5])))
    missing.warn()
    return samples


def convert_iedit(src: Path, out: Path, split: str = "test", images: Path | None = None,
                  skip_missing: bool = False) -> list[Sample]:
    """IEdit: source/target pairs; every request sentence is a reference (3 in valid/test); the
    paper reference (``output``) is the ``sents`` joined with ". " as stored (DEMON's ``response``)."""
    path = src / f"{split}.json"
    records = _load_json(path)
    image_dir = images or (src / "images")
    missing = _Missing(skip_missing, path)
    prompt = INSTRUCTIONS["iedit"] + IEDIT_CONTEXT
    samples = []
    for i, r in enumerate(records):
        uid = str(_field(r, "uid", path, f"record #{i}"))
        raw = _field(r, "sents", path, f"record {uid}")
        sents = [s.strip() for s in raw if s.strip()]
        if not sents:
            raise DataError(f"{path}: record {uid!r}: no request sentence")
        a, b = image_dir / _field(r, "img0", path, f"record {uid}"), image_dir / _field(r, "img1", path, uid)
        if not a.is_file() or not b.is_file():
            missing(uid, f"image {a if not a.is_file() else b} not found")
            continue
        samples.append(Sample(uid, (_rel(out, a), _rel(out, b)), prompt, DEMON_JOINER.join(raw), tuple(sents)))
    missing.warn()
    return samples


def convert_nico(src: Path, out: Path, split: str = "test", group_size: int = 5, seed: int = 0,
                 superclass: str | None = None) -> list[Sample]:
    """NICO Animal/Vehicle: groups of ``group_size`` images of one (concept, context) folder.

    NICO has no annotation file; our reference is "{concept} {context}" from the folder names
    (how the SAM authors phrased theirs is not known: their converted files take precedence).
    """
    root = src / superclass if superclass else src
    if not root.is_dir():
        raise DataError(f"{root}: folder not found (expected {{Animal|Vehicle}}/{{concept}}/{{context}}/images)")
    rng = random.Random(f"nico/{seed}")
    prompt = INSTRUCTIONS["group_captioning"].format(count=NUMBER_WORDS[group_size])
    samples = []
    for concept in sorted(p for p in root.iterdir() if p.is_dir()):
        for context in sorted(p for p in concept.iterdir() if p.is_dir()):
            files = sorted(p for p in context.iterdir() if p.suffix in IMAGE_EXTENSIONS)
            rng.shuffle(files)
            for g in range(len(files) // group_size):
                group = files[g * group_size:(g + 1) * group_size]
                sid = f"{concept.name}/{context.name}/{g}"
                text = f"{concept.name} {context.name}".replace("_", " ")
                samples.append(Sample(sid, tuple(_rel(out, p) for p in group), prompt, text))
    return samples


def convert_demon(src: Path, out: Path, split: str = "core", demon_dataset: str | None = None) -> list[Sample]:
    """DEMON ``{root}/{DATASET}/core/core.json``: prompt = task_instruction[id] + context."""
    path = (src / demon_dataset / "core" / "core.json") if demon_dataset else (src / "core" / "core.json")
    if not path.is_file() and (src / "core.json").is_file():
        path = src / "core.json"
    core = _load_json(path)
    meta = _field(core, "metadata", path, "top level")
    templates = _field(meta, "task_instruction", path, "metadata")
    samples = []
    for i, rec in enumerate(_field(core, "data", path, "top level")):
        sid = _field(rec, "sample_id", path, f"data[{i}]")
        inst = _field(rec, "task_instance", path, f"sample {sid}")
        tid = int(_field(rec, "task_instruction_id", path, f"sample {sid}"))
        if not 0 <= tid < len(templates):
            raise DataError(f"{path}: sample {sid}: task_instruction_id {tid} outside {len(templates)} templates")
        images = [path.parent / "images" / p for p in _field(inst, "images_path", path, f"sample {sid}")]
        samples.append(Sample(sid, tuple(_rel(out, p) for p in images),
                              templates[tid] + _field(inst, "context", path, f"sample {sid}"),
                              str(_field(rec, "response", path, f"sample {sid}"))))
    return samples


def convert_passthrough(src: Path, out: Path, annotations: str = "annotations.json") -> list[Sample]:
    """The SAM authors' converted sets (Conceptual, DM800K, AESOP, VIST): validated, paths rebased."""
    samples, _bad = read_annotations(src / annotations, check_images=True)
    return [Sample(s.id, tuple(_rel(out, src / p) for p in s.img_list), s.instruction, s.output, s.references)
            for s in samples]


CONVERTERS: dict[str, Callable[..., list[Sample]]] = {
    "vist": convert_vist, "aesop": convert_aesop, "clevr_change": convert_clevr_change,
    "spot_the_diff": convert_spot_the_diff, "birds_to_words": convert_birds_to_words, "iedit": convert_iedit,
    "nico": convert_nico, "demon": convert_demon, "passthrough": convert_passthrough,
}

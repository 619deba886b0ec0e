"""The one sample schema (docs/DESIGN.md §3) and a validating reader for ``annotations.json``.

``{"id": int | str, "img_list": [paths relative to the dataset folder], "instruction": str,
"output": str, "references": [str, ...] (optional)}``. Every problem is reported with the file,
the sample (index and id) and the field; with ``skip_bad`` the bad samples are listed and the
rest are returned. The file is a JSON list; a ``.jsonl`` file is read as JSON Lines (one sample
per line). With ``check_images`` every image is decoded fully (a truncated file, a decompression
bomb or a directory is a bad sample here, not a crash half-way through an evaluation).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from sam_mllm.data.images import ImageLoadError, load_image
from sam_mllm.errors import UserError


class DataError(UserError, ValueError):
    """Bad data; the message names the file, and the sample and field where there is one."""


REFERENCE_MODES = ("paper", "all")


@dataclass(frozen=True)
class Sample:
    id: int | str
    img_list: tuple[str, ...]
    instruction: str
    output: str
    references: tuple[str, ...] = ()

    @property
    def all_references(self) -> tuple[str, ...]:
        """Every human reference: ``references`` if given, else ``(output,)``."""
        return self.references or (self.output,)

    def scoring_references(self, mode: str) -> tuple[str, ...]:
        """The references scored under ``eval.references``: ``paper`` = the one ``output`` (the
        converters build it as DEMON built the response the paper scored against), ``all`` =
        :attr:`all_references`."""
        if mode == "paper":
            return (self.output,)
        if mode == "all":
            return self.all_references
        raise ValueError(f"eval.references must be one of {REFERENCE_MODES}, not {mode!r}")

    def to_json(self) -> dict:
        d = {"id": self.id, "img_list": list(self.img_list), "instruction": self.instruction, "output": self.output}
        if self.references:
            d["references"] = list(self.references)
        return d


@dataclass(frozen=True)
class BadSample:
    index: int
    id: object
    reason: str


@dataclass
class _Problems:
    skip: bool
    file: str
    bad: list[BadSample] = field(default_factory=list)

    def report(self, index: int, sid: object, reason: str) -> None:
        where = f"sample #{index}" + (f" (id {sid!r})" if sid is not None else "")
        if not self.skip:
            raise DataError(f"{self.file}: {where}: {reason}")
        self.bad.append(BadSample(index, sid, reason))


def resolve_image(root: str | Path, rel: str) -> Path:
    return Path(root) / rel


def _check(raw: object, index: int, max_images: int | None) -> tuple[object, str | None]:
    """(id, problem) of one raw record; problem is None when the record is well-formed."""
    if not isinstance(raw, dict):
        return None, f"is a {type(raw).__name__}, not an object"
    sid = raw.get("id")
    for key in ("id", "img_list", "instruction", "output"):
        if key not in raw:
            return sid, f"field '{key}' is missing"
    if isinstance(sid, bool) or not isinstance(sid, (int, str)):
        return sid, f"field 'id' must be an int or a string, not {type(sid).__name__}"
    imgs = raw["img_list"]
    if not isinstance(imgs, list) or not all(isinstance(p, str) and p for p in imgs):
        return sid, "field 'img_list' must be a list of non-empty path strings"
    if not imgs:
        return sid, "field 'img_list' is empty"
    if max_images is not None and len(imgs) > max_images:
        return sid, f"field 'img_list' has {len(imgs)} images; the model takes at most {max_images} (model.max_images)"
    if not isinstance(raw["instruction"], str) or not raw["instruction"].strip():
        return sid, "field 'instruction' must be a non-empty string"
    if not isinstance(raw["output"], str):
        return sid, "field 'output' must be a string"
    refs = raw.get("references")
    if refs is not None and (not isinstance(refs, list) or not all(isinstance(r, str) for r in refs)):
        return sid, "field 'references' must be a list of strings"
    empty = [i for i, r in enumerate(refs or []) if not r.strip()]
    if empty:  # metrics cannot score against an empty reference; fail now, not after all generation
        return sid, f"field 'references': reference #{empty[0]} is empty"
    if not raw["output"].strip() and not refs:
        return sid, "field 'output' is empty and there are no 'references'"
    unknown = sorted(set(raw) - {"id", "img_list", "instruction", "output", "references"})
    if unknown:
        return sid, f"unknown field(s) {unknown}"
    return sid, None


def read_annotations(path: str | Path, *, root: str | Path | None = None, max_images: int | None = None,
                     check_images: bool = True, skip_bad: bool = False) -> tuple[list[Sample], list[BadSample]]:
    """Read and validate ``annotations.json``; image paths resolve against ``root`` (its folder)."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    if not path.is_file():
        raise DataError(f"{path}: annotations file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    data = _json_lines(path, text) if path.suffix == ".jsonl" else _json_list(path, text)
    problems = _Problems(skip_bad, str(path))
    samples: list[Sample] = []
    first_index: dict[str, int] = {}
    records = tqdm(enumerate(data), total=len(data), desc=f"check {path.parent.name}", unit="sample",
                   disable=len(data) < 2000)
    for index, raw in records:
        sid, problem = _check(raw, index, max_images)
        if problem is None:
            key = json.dumps(sid)
            if key in first_index:
                problem = f"duplicated id (first used by sample #{first_index[key]})"
            else:
                first_index[key] = index
        if problem is None and check_images:
            problem = _image_problem(root, raw["img_list"])
        if problem is not None:
            problems.report(index, sid, problem)
            continue
        samples.append(Sample(sid, tuple(raw["img_list"]), raw["instruction"], raw["output"],
                              tuple(raw.get("references") or ())))
    if not samples:
        raise DataError(f"{path}: no usable samples" + (f" ({len(problems.bad)} bad)" if problems.bad else ""))
    return samples, problems.bad


def _json_list(path: Path, text: str) -> list:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and _looks_like_json_lines(text):
            raise DataError(f"{path}: expected a JSON list of samples; this looks like JSON Lines (one object per "
                            "line): name the file *.jsonl to read it as such, or wrap the objects in [...]") from None
        raise DataError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, list):
        hint = " (one sample per line? name the file *.jsonl)" if isinstance(data, dict) else ""
        raise DataError(f"{path}: the top level must be a list of samples, not {type(data).__name__}{hint}")
    return data


def _json_lines(path: Path, text: str) -> list:
    data = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {lineno}: malformed JSON at column {exc.colno}: {exc.msg}") from None
    return data


def _looks_like_json_lines(text: str) -> bool:
    lines = [line for line in text.splitlines() if line.strip()][:3]
    try:
        return len(lines) > 1 and all(isinstance(json.loads(line), dict) for line in lines)
    except json.JSONDecodeError:
        return False


def _image_problem(root: Path, paths: Iterable[str]) -> str | None:
    for rel in paths:
        full = root / rel
        if full.is_dir():
            return f"field 'img_list': {full} is a directory, not an image file"
        if not full.is_file():
            return f"field 'img_list': image file not found: {full}"
        try:
            load_image(full)  # decodes every pixel: verify() alone misses truncated files
        except ImageLoadError as exc:
            return "field 'img_list': " + (f"unreadable image {full}: {exc.reason}" if exc.reason else exc.problem)
    return None


def write_annotations(samples: Iterable[Sample | dict], path: str | Path) -> Path:
    """Pretty JSON, written to a temporary file and renamed, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [s.to_json() if isinstance(s, Sample) else s for s in samples]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)
    return path

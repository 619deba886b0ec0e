"""Instruction-tuning data of the tiny backbone: deterministic, and held-out phrasings stay held out."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from sam_mllm.data.instructions import HELDOUT_FILES, HELDOUT_TASKS, TASKS, ZERO_SHOT_WORDS, phrasings
from sam_mllm.data.synthetic import COLOURS, PATTERNS, SHAPES, generate, tokenize_words

SIZES = {"instruct": {"train": 60, "val": 4, "test": 30}}
_NAME = f"(?:{'|'.join(COLOURS)})(?: (?:{'|'.join(PATTERNS)}))? (?:{'|'.join(SHAPES)})"
_FIELDS = {"shape": "|".join(SHAPES), "colour": "|".join(COLOURS), "name": _NAME, "side": "left|right"}


def _regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?:{_FIELDS[p]})" for i, p in enumerate(parts)))


def _templates(task: str, which: str) -> list[re.Pattern]:
    t = {x.name: x for x in (*TASKS, *HELDOUT_TASKS)}[task]
    return [_regex(p) for p in getattr(t, which)]


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    generate(root, seed=5, sizes=SIZES, datasets=["instruct"], workers=2)
    return root


def _read(world, split, name="annotations.json"):
    folder = world / "instruct" / split
    tasks = json.loads((folder / "tasks.json").read_text())[name]
    return [r | {"task": tasks[r["id"]]} for r in json.loads((folder / name).read_text())]


def test_same_seed_same_bytes_other_seed_other_data(world, tmp_path):
    generate(tmp_path / "again", seed=5, sizes=SIZES, datasets=["instruct"], workers=1)
    assert _digest(world) == _digest(tmp_path / "again")
    generate(tmp_path / "other", seed=6, sizes=SIZES, datasets=["instruct"], workers=1)
    assert _read(tmp_path / "other", "train") != _read(world, "train")


def test_training_splits_never_use_a_heldout_phrasing_or_task(world):
    heldout = [_regex(p) for p in (*phrasings("heldout_phrasing"), *phrasings("heldout_task"))]
    held_in = {t.name for t in TASKS}
    seen_tasks = set()
    for split in ("train", "val"):
        for r in _read(world, split):
            assert r["task"] in held_in
            assert any(rx.fullmatch(r["instruction"]) for rx in _templates(r["task"], "train")), r
            assert not any(rx.fullmatch(r["instruction"]) for rx in heldout), r
            seen_tasks.add(r["task"])
    assert len(seen_tasks) >= 8  # the mixture really is many tasks


def test_heldout_files_ask_the_same_images_the_held_out_way(world):
    held_in, rephrased, new_task = (_read(world, "test"), _read(world, "test", HELDOUT_FILES["heldout_phrasing"]),
                                    _read(world, "test", HELDOUT_FILES["heldout_task"]))
    assert len(held_in) == len(rephrased) == len(new_task) == SIZES["instruct"]["test"]
    for a, b, c in zip(held_in, rephrased, new_task):
        assert a["img_list"] == b["img_list"] == c["img_list"] and a["id"] == b["id"] == c["id"]
        assert any(rx.fullmatch(a["instruction"]) for rx in _templates(a["task"], "train"))
        # same task and answer, only the phrasing differs
        assert b["task"] == a["task"] and b["output"] == a["output"]
        assert any(rx.fullmatch(b["instruction"]) for rx in _templates(b["task"], "heldout"))
        assert c["task"] in {t.name for t in HELDOUT_TASKS}
        assert any(rx.fullmatch(c["instruction"]) for rx in _templates(c["task"], "heldout"))


def test_phrasing_sets_are_disjoint_and_use_known_words():
    train = set(phrasings("train"))
    assert not train & set(phrasings("heldout_phrasing")) and not train & set(phrasings("heldout_task"))
    train_words = {w for p in train for w in tokenize_words(p)}
    assert not train_words & ZERO_SHOT_WORDS  # the zero-shot tasks' instructions stay unseen
    for p in (*phrasings("heldout_phrasing"), *phrasings("heldout_task")):
        assert set(tokenize_words(p)) <= train_words, p
    assert all(len(t.train) >= 8 and len(t.heldout) >= 2 for t in TASKS)


def test_answers_are_right_about_the_scene(world):
    # every answer is grounded: a yes/no answer is yes or no, counts are number words, etc.
    for r in _read(world, "train"):
        if r["task"] == "exists":
            assert r["output"] in ("yes.", "no.")
        elif r["task"] == "count":
            assert r["output"] in ("one.", "two.", "three.")
        elif r["task"] == "colour":
            assert r["output"][:-1] in COLOURS
        elif r["task"] == "describe":
            assert r["output"].startswith("a ")

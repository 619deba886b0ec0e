"""The synthetic world: deterministic, valid samples, a closed vocabulary, honest tasks."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from sam_mllm.data.schema import read_annotations
from sam_mllm.data.synthetic import DATASETS, generate, tokenize_words, vocabulary

SMALL = {d: {"train": 6, "val": 2, "test": 4} for d in DATASETS}


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate(root, seed=3, sizes=SMALL, datasets=DATASETS, workers=2)
    return root


def test_same_seed_same_bytes_any_worker_count(world, tmp_path):
    generate(tmp_path / "again", seed=3, sizes=SMALL, datasets=DATASETS, workers=1)
    assert _digest(world) == _digest(tmp_path / "again")
    generate(tmp_path / "other", seed=4, sizes=SMALL, datasets=["mmlink"], workers=1)
    assert _digest(tmp_path / "other" / "mmlink") != {k: v for k, v in _digest(world / "mmlink").items()}


def test_every_split_validates_against_the_schema(world):
    for d in DATASETS:
        for split, n in SMALL[d].items():
            samples, bad = read_annotations(world / d / split / "annotations.json", max_images=5)
            assert len(samples) == n and not bad
            for s in samples:
                for p in s.img_list:
                    assert Image.open(world / d / split / p).size == (64, 64)
    manifest = json.loads((world / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["counts"]["mmlink"]["train"] == 6


def test_vocabulary_covers_every_text(world):
    vocab = set(vocabulary())
    for d in DATASETS:
        for split in SMALL[d]:
            for s in json.loads((world / d / split / "annotations.json").read_text()):
                words = tokenize_words(s["instruction"]) + tokenize_words(s["output"])
                assert set(words) <= vocab, set(words) - vocab


def test_tasks_are_what_they_say(world):
    for s in json.loads((world / "group_captioning" / "test" / "annotations.json").read_text()):
        assert 2 <= len(s["img_list"]) <= 5 and s["output"].startswith("a ")
    for s in json.loads((world / "storytelling" / "test" / "annotations.json").read_text()):
        n = len(s["img_list"])
        assert s["instruction"].endswith(f"{{image#{n}}}Caption#{n}:")
    for s in json.loads((world / "mmlink" / "train" / "annotations.json").read_text()):
        assert len(s["img_list"]) == 2
    for s in json.loads((world / "change_captioning" / "test" / "annotations.json").read_text()):
        a, b = (np.asarray(Image.open(world / "change_captioning" / "test" / p), dtype=int) for p in s["img_list"])
        changed = (np.abs(a - b).sum(-1) > 0).mean()
        assert 0 < changed < 0.5, (s["output"], changed)  # one object differs, the scene stays
        assert any(w in s["output"] for w in ("added", "removed", "moved", "turned"))


def test_diverse_mmlink_instructions_change_only_the_instructions(world, tmp_path):
    from sam_mllm.data.synthetic import GROUP_INSTRUCTION, MMLINK_INSTRUCTIONS_DIVERSE

    sizes = {"mmlink": {"train": 40, "val": 0, "test": 0}}
    generate(tmp_path / "fixed", seed=3, sizes=sizes, datasets=["mmlink"], workers=1)
    generate(tmp_path / "diverse", seed=3, sizes=sizes, datasets=["mmlink"], workers=1, mmlink_instructions="diverse")
    images = lambda root: {k: v for k, v in _digest(root / "mmlink").items() if k.endswith(".png")}  # noqa: E731
    assert images(tmp_path / "fixed") == images(tmp_path / "diverse")
    fixed, diverse = (json.loads((tmp_path / r / "mmlink" / "train" / "annotations.json").read_text())
                      for r in ("fixed", "diverse"))
    assert [s["output"] for s in fixed] == [s["output"] for s in diverse]
    assert {s["instruction"] for s in diverse} <= set(MMLINK_INSTRUCTIONS_DIVERSE)
    assert len({s["instruction"] for s in diverse}) > 8 > len({s["instruction"] for s in fixed})
    vocab, group_words = set(vocabulary()), {"sum", "common", "factor", "statement"}
    for text in MMLINK_INSTRUCTIONS_DIVERSE:
        assert set(tokenize_words(text)) <= vocab and not set(tokenize_words(text)) & group_words, text
    assert group_words <= set(tokenize_words(GROUP_INSTRUCTION))
    assert json.loads((tmp_path / "diverse" / "manifest.json").read_text())["mmlink_instructions"] == "diverse"
    with pytest.raises(ValueError, match="mmlink_instructions"):
        generate(tmp_path / "x", sizes=sizes, datasets=["mmlink"], mmlink_instructions="many")

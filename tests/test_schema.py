"""Every bad input names the file, the sample and the field; skip_bad lists and keeps going."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from sam_mllm.data.schema import DataError, Sample, read_annotations, write_annotations


@pytest.fixture
def folder(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    return tmp_path


def good(i, **kw):
    return {"id": i, "img_list": ["a.png", "b.png"], "instruction": "what changed?", "output": "x", **kw}


BAD = {
    "missing image": (good(1, img_list=["a.png", "nope.png"]), "image file not found: .*nope.png"),
    "unreadable image": (good(1, img_list=["broken.png"]), "unreadable image .*broken.png"),
    "missing field": ({"id": 1, "img_list": ["a.png"], "output": "x"}, "field 'instruction' is missing"),
    "empty img_list": (good(1, img_list=[]), "field 'img_list' is empty"),
    "too many images": (good(1, img_list=["a.png"] * 4), "has 4 images; the model takes at most 3"),
    "bad id": (good(1.5), "field 'id' must be an int or a string"),
    "empty output": (good(1, output=""), "'output' is empty"),
    "unknown field": (good(1, extra=1), r"unknown field\(s\) \['extra'\]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sample_is_named(folder, case):
    record, message = BAD[case]
    path = folder / "annotations.json"
    path.write_text(json.dumps([good(0), record, good(2)]))
    with pytest.raises(DataError, match=rf"annotations.json: sample #1( \(id 1(\.5)?\))?: .*{message}"):
        read_annotations(path, max_images=3)
    samples, bad = read_annotations(path, max_images=3, skip_bad=True)
    assert [s.id for s in samples] == [0, 2]
    assert len(bad) == 1 and bad[0].index == 1 and re.search(message, bad[0].reason)


def test_duplicated_id(folder):
    path = folder / "annotations.json"
    path.write_text(json.dumps([good("x"), good("y"), good("x")]))
    with pytest.raises(DataError, match=r"sample #2 \(id 'x'\): duplicated id \(first used by sample #0\)"):
        read_annotations(path)


def test_malformed_json_and_top_level(folder):
    path = folder / "annotations.json"
    path.write_text('[{"id": 1,\n "img_list": ["a.png"]')
    with pytest.raises(DataError, match="annotations.json: malformed JSON at line 2"):
        read_annotations(path)
    path.write_text(json.dumps({"id": 1}))
    with pytest.raises(DataError, match="top level must be a list"):
        read_annotations(path)
    with pytest.raises(DataError, match="annotations file not found"):
        read_annotations(folder / "none.json")


def test_round_trip_and_references(folder):
    samples = [Sample(0, ("a.png",), "q?", "x"), Sample("k", ("a.png", "b.png"), "q?", "y", ("y", "z"))]
    path = write_annotations(samples, folder / "annotations.json")
    back, bad = read_annotations(path)
    assert back == samples and not bad
    assert back[0].all_references == ("x",) and back[1].all_references == ("y", "z")
    assert not list(folder.glob("*.tmp"))



"""Each benchmark converter on a small fixture in the original format (real excerpts where we have them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sam_mllm.data.convert import (
    CHANGE_CONTEXT,
    INSTRUCTIONS,
    convert_aesop,
    convert_birds_to_words,
    convert_clevr_change,
    convert_demon,
    convert_iedit,
    convert_nico,
    convert_passthrough,
    convert_spot_the_diff,
    convert_vist,
    story_prompt,
)
from sam_mllm.data.schema import DataError, read_annotations

REAL = Path(__file__).parent / "fixtures" / "real_formats"


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path)
    return path


def _resolve(out: Path, sample) -> list[Path]:
    return [(out / p).resolve() for p in sample.img_list]


def test_vist_real_record_extended_to_a_story(tmp_path):
    real = json.loads((REAL / "vist" / "test_sis_quoted_records.json").read_text())
    first = real["annotations"][0][0]
    texts = [first["original_text"], "Lots of folks come.", "Crafts are unique.", "All ages come.", "Costumes too."]
    annotations = []
    for order in (3, 0, 4, 1, 2):  # file order is not story order
        a = dict(first, worker_arranged_photo_order=order, photo_flickr_id=str(1741642 + order),
                 original_text=texts[order])
        annotations.append([a])
    src = tmp_path / "vist"
    (src / "sis").mkdir(parents=True)
    (src / "sis" / "test.story-in-sequence.json").write_text(json.dumps({**real, "annotations": annotations}))
    for order in range(5):
        _png(src / "images" / "test" / f"{1741642 + order}{'.png' if order == 2 else '.jpg'}")
    out = tmp_path / "out"
    [s] = convert_vist(src, out, "test")
    assert s.id == "45530"
    assert s.instruction == story_prompt(texts[:4])
    assert s.instruction.endswith("{image#4}Caption#4:All ages come.{image#5}Caption#5:")
    assert s.output == "Costumes too."
    assert [p.name for p in _resolve(out, s)] == ["1741642.jpg", "1741643.jpg", "1741644.png", "1741645.jpg",
                                                  "1741646.jpg"]
    annotations.pop()
    (src / "sis" / "test.story-in-sequence.json").write_text(json.dumps({**real, "annotations": annotations}))
    with pytest.raises(DataError, match="story '45530' has 4 annotations"):
        convert_vist(src, out, "test")


def test_vist_missing_image_names_the_story(tmp_path):
    real = json.loads((REAL / "vist" / "test_sis_quoted_records.json").read_text())
    a = real["annotations"][0][0]
    anns = [[dict(a, worker_arranged_photo_order=k, photo_flickr_id=str(k))] for k in range(5)]
    src = tmp_path / "vist"
    (src / "sis").mkdir(parents=True)
    (src / "sis" / "test.story-in-sequence.json").write_text(json.dumps({"annotations": anns}))
    for k in range(4):
        _png(src / "images" / "test" / f"{k}.jpg")
    with pytest.raises(DataError, match=r"record '45530': image 4\.\* not found"):
        convert_vist(src, tmp_path / "out", "test")
    with pytest.warns(UserWarning, match="dropped 1 samples"):
        assert convert_vist(src, tmp_path / "out", "test", skip_missing=True) == []


def test_aesop_real_sample_file(tmp_path):
    src = tmp_path / "aesop"
    (src / "data").mkdir(parents=True)
    stories = json.loads((REAL / "aesop" / "sample_train.json").read_text())
    (src / "data" / "test.json").write_text(json.dumps(stories))
    for st in stories:
        for k, p in enumerate(st["image_path"]):
            _png(src / (p if k != 1 else p.replace(".png", ".jpg")))  # rendered panels may be .jpg
    out = tmp_path / "out"
    samples = convert_aesop(src, out, "test")
    assert [s.id for s in samples] == [st["storyid"] for st in stories]
    s, st = samples[0], stories[0]
    assert s.output == st["text"][2].strip()
    assert s.instruction == story_prompt([st["text"][0].strip(), st["text"][1].strip()])
    assert [p.name for p in _resolve(out, s)] == ["panel_0.png", "panel_1.jpg", "panel_2.png"]


def test_clevr_change_real_split_file(tmp_path):
    src = tmp_path / "clevr"
    splits = json.loads((REAL / "clevr_change" / "splits_first50.json").read_text())
    test_ids = splits["test"][:3]
    names = [f"CLEVR_default_{i:06d}.png" for i in range(max(test_ids) + 1)]
    for n in names:
        _png(src / "images" / n)
    for i in test_ids:
        _png(src / "sc_images" / f"CLEVR_semantic_{i:06d}.png")
        _png(src / "nsc_images" / f"CLEVR_nonsemantic_{i:06d}.png")
    (src / "splits.json").write_text(json.dumps({"train": [], "val": [], "test": test_ids}))
    (src / "change_captions.json").write_text(json.dumps(
        {names[i]: [f"the cube {i} turned red", "a thing changed"] for i in test_ids}))
    (src / "no_change_captions.json").write_text(json.dumps({names[i]: ["nothing changed"] for i in test_ids}))
    out = tmp_path / "out"
    samples = convert_clevr_change(src, out, "test")
    assert [s.id for s in samples] == [x for i in test_ids for x in (f"{i:06d}", f"{i:06d}_nsc")]
    s = samples[0]
    assert s.instruction == INSTRUCTIONS["change_captioning"] + CHANGE_CONTEXT
    assert s.references == (f"the cube {test_ids[0]} turned red", "a thing changed")
    assert [p.name for p in _resolve(out, s)] == [names[test_ids[0]], f"CLEVR_semantic_{test_ids[0]:06d}.png"]
    assert len(convert_clevr_change(src, out, "test", nonsemantic=False)) == 3
    with pytest.raises(DataError, match="no split 'dev'"):
        convert_clevr_change(src, out, "dev")


def test_spot_the_diff_real_records_grouped_and_empty_ones_reported(tmp_path):
    src = tmp_path / "std"
    records = json.loads((REAL / "spot_the_diff" / "test_first30.json").read_text())
    records += json.loads((REAL / "spot_the_diff" / "test_selected.json").read_text())
    (src / "data" / "annotations").mkdir(parents=True)
    (src / "data" / "annotations" / "test.json").write_text(json.dumps(records))
    ids = list(dict.fromkeys(r["img_id"] for r in records))
    for i in ids:
        _png(src / "resized_images" / f"{i}.png")
        _png(src / "resized_images" / f"{i}_2.png")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="7 records have no sentence"):
        samples = convert_spot_the_diff(src, out, "test")
    by_id = {s.id: s for s in samples}
    assert by_id["256"].references == ("person with umbrella is gone. person with red coat is moved. "
                                       "car up at top to left is now missing",)
    assert by_id["138"].references[-2:] == ("there is no difference", "there are no differences")
    assert "9420" not in by_id  # its only record is [""]
    assert len(samples) == len(ids) - 7


def test_iedit_real_records(tmp_path):
    src = tmp_path / "iedit"
    records = json.loads((REAL / "iedit" / "test_first30.json").read_text())[:4]
    src.mkdir()
    (src / "test.json").write_text(json.dumps(records))
    for r in records:
        _png(src / "images" / r["img0"])
        _png(src / "images" / r["img1"])
    out = tmp_path / "out"
    samples = convert_iedit(src, out, "test")
    assert [s.id for s in samples] == [r["uid"] for r in records]
    assert samples[0].references == tuple(records[0]["sents"])
    assert samples[0].instruction.endswith("Source Image:{image#1} Target Image:{image#2}Instruction:")
    assert [p.name for p in _resolve(out, samples[0])] == [records[0]["img0"], records[0]["img1"]]


def test_birds_to_words_tsv_grouping_and_image_map(tmp_path):
    header = ["img1ObservationURL", "img1ImgURL", "img1Species", "img1Selection", "img2ObservationURL",
              "img2ImgURL", "img2Species", "img2Selection", "split", "annN", "description"]
    rows = [["o1", "http://x/a.jpg", "s1", "1", "o2", "http://x/b.jpg", "s2", "1", "test", str(k),
             f"animal1 is bigger than animal2 {k}"] for k in range(1, 4)]
    rows.append(["o3", "http://x/c.jpg", "s3", "1", "o4", "http://x/d.jpg", "s4", "1", "train", "1", "x"])
    tsv = tmp_path / "birds-to-words-v1.0.tsv"
    tsv.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    a, b = _png(tmp_path / "dl" / "one.jpg"), _png(tmp_path / "dl" / "two.jpg")
    (tmp_path / "map.json").write_text(json.dumps({"http://x/a.jpg": str(a), "http://x/b.jpg": str(b)}))
    out = tmp_path / "out"
    [s] = convert_birds_to_words(tsv, out, "test", image_map=tmp_path / "map.json")
    assert s.references == tuple(f"animal1 is bigger than animal2 {k}" for k in range(1, 4))
    assert s.instruction == INSTRUCTIONS["birds_to_words"] + CHANGE_CONTEXT
    assert _resolve(out, s) == [a.resolve(), b.resolve()]
    _png(tmp_path / "images" / "a.jpg")
    with pytest.raises(DataError, match="image for http://x/b.jpg not found"):
        convert_birds_to_words(tsv, out, "test")


def test_nico_groups(tmp_path):
    src = tmp_path / "NICO"
    for concept in ("dog", "cat"):
        for ctx in ("on_grass", "in_water"):
            for k in range(7):
                _png(src / "Animal" / concept / ctx / f"{k}.jpg")
    samples = convert_nico(src, tmp_path / "out", group_size=3, superclass="Animal")
    assert len(samples) == 8  # 4 folders x 2 full groups of 3
    assert samples[0].id == "cat/in_water/0" and samples[0].output == "cat in water"
    assert samples[0].instruction == "Sum up the common factor in these three pictures in a single statement."
    again = convert_nico(src, tmp_path / "out", group_size=3, superclass="Animal")
    assert again == samples


@pytest.mark.parametrize("name", ["VIST", "AESOP", "IEdit", "Spot-the-Diff", "Birds-to-Words", "CLEVR-Change"])
def test_demon_core_layout_with_real_records(tmp_path, name):
    meta = json.loads((REAL / "demon_core" / f"{name}.metadata.json").read_text())
    example = json.loads((REAL / "demon_core" / f"{name}.example.json").read_text())
    core = tmp_path / "DEMON" / name / "core"
    core.mkdir(parents=True)
    (core / "core.json").write_text(json.dumps({"metadata": meta, "data": [example]}))
    for p in example["task_instance"]["images_path"]:
        _png(core / "images" / p)
    out = tmp_path / "out"
    [s] = convert_demon(tmp_path / "DEMON", out, demon_dataset=name)
    assert s.id == example["sample_id"]
    assert s.instruction == meta["task_instruction"][example["task_instruction_id"]] + \
        example["task_instance"]["context"]
    assert s.output == example["response"]
    assert [p.name for p in _resolve(out, s)] == example["task_instance"]["images_path"]


def test_passthrough_rebases_paths(tmp_path):
    src = tmp_path / "conceptual"
    _png(src / "imgs" / "0.jpg")
    _png(src / "imgs" / "1.jpg")
    (src / "annotations.json").write_text(json.dumps(
        [{"id": 0, "img_list": ["imgs/0.jpg", "imgs/1.jpg"], "instruction": "Sum up.", "output": "dogs"}]))
    out = tmp_path / "elsewhere" / "conceptual"
    [s] = convert_passthrough(src, out)
    assert _resolve(out, s) == [(src / "imgs" / "0.jpg").resolve(), (src / "imgs" / "1.jpg").resolve()]


def test_prepare_cli(tmp_path):
    src = tmp_path / "iedit"
    records = json.loads((REAL / "iedit" / "test_first30.json").read_text())[:3]
    src.mkdir()
    (src / "test.json").write_text(json.dumps(records))
    for r in records:
        _png(src / "images" / r["img0"])
        _png(src / "images" / r["img1"])
    out = tmp_path / "prepared"
    proc = subprocess.run([sys.executable, "-m", "sam_mllm.data.prepare", "iedit", "--src", str(src),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "3 samples, 6 images, 3.00 references per sample" in proc.stdout
    samples, bad = read_annotations(out / "annotations.json")  # images resolve from the new folder
    assert len(samples) == 3 and not bad
    proc = subprocess.run([sys.executable, "-m", "sam_mllm.data.prepare", "iedit", "--src", str(tmp_path / "no"),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


# The paper's one reference per sample, built as DEMON built its core.json `response`.

def _demon_response(name: str) -> str:
    return json.loads((REAL / "demon_core" / f"{name}.example.json").read_text())["response"]


def test_iedit_paper_reference_is_demons_response_byte_for_byte(tmp_path):
    src = tmp_path / "iedit"
    records = json.loads((REAL / "iedit" / "test_first30.json").read_text())[:2]
    src.mkdir()
    (src / "test.json").write_text(json.dumps(records))
    for r in records:
        _png(src / "images" / r["img0"])
        _png(src / "images" / r["img1"])
    samples = convert_iedit(src, tmp_path / "out", "test")
    assert samples[0].id == "Reddit_1052"
    assert samples[0].output == _demon_response("IEdit")
    assert samples[0].scoring_references("paper") == (_demon_response("IEdit"),)
    assert samples[0].scoring_references("all") == tuple(records[0]["sents"])
    assert samples[1].output == ". ".join(records[1]["sents"])


def test_spot_the_diff_paper_reference_is_demons_response_and_data_layout(tmp_path):
    src = tmp_path / "std"
    records = json.loads((REAL / "spot_the_diff" / "test_first30.json").read_text())
    records += json.loads((REAL / "spot_the_diff" / "test_selected.json").read_text())
    src.mkdir()
    (src / "test.json").write_text(json.dumps(records))
    for i in dict.fromkeys(r["img_id"] for r in records):  # the release README's layout
        _png(src / "data" / "resized_images" / f"{i}.png")
        _png(src / "data" / "resized_images" / f"{i}_2.png")
    with pytest.warns(UserWarning, match="7 records have no sentence"):
        samples = convert_spot_the_diff(src, tmp_path / "out", "test")
    assert samples[0].id == records[0]["img_id"]
    assert samples[0].output == _demon_response("Spot-the-Diff")
    by_id = {s.id: s for s in samples}
    first_138 = next(r for r in records if r["img_id"] == "138")
    assert by_id["138"].output == ". ".join(first_138["sentences"])  # the first annotator's record
    assert len(by_id["138"].scoring_references("all")) == 3
    assert all(s.output.strip() for s in samples)
    empty = tmp_path / "no_images"
    empty.mkdir()
    (empty / "test.json").write_text(json.dumps(records[:1]))
    with pytest.raises(DataError, match="no image folder .*data/resized_images.*--images"):
        convert_spot_the_diff(empty, tmp_path / "out", "test")


def test_birds_to_words_paper_reference_is_the_first_description_as_stored(tmp_path):
    header = ["img1ObservationURL", "img1ImgURL", "img1Species", "img1Selection", "img2ObservationURL",
              "img2ImgURL", "img2Species", "img2Selection", "split", "annN", "description"]
    first = _demon_response("Birds-to-Words")
    rows = [["o1", "http://x/a.jpg", "s1", "1", "o2", "http://x/b.jpg", "s2", "1", "test", str(k), d]
            for k, d in enumerate([first, "animal1 is smaller ."], start=1)]
    tsv = tmp_path / "b2w.tsv"
    tsv.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    _png(tmp_path / "images" / "a.jpg")
    _png(tmp_path / "images" / "b.jpg")
    [s] = convert_birds_to_words(tsv, tmp_path / "out", "test")
    assert s.output == first
    assert s.references == (first, "animal1 is smaller .")


def _clevr_release(src: Path, numbers: list[int], captions: dict[int, list[str]]) -> None:
    """Only the renders of ``numbers`` on disk, as when a user keeps just the captioned images."""
    for i in numbers:
        _png(src / "images" / f"CLEVR_default_{i:06d}.png")
        _png(src / "sc_images" / f"CLEVR_semantic_{i:06d}.png")
    (src / "splits.json").write_text(json.dumps({"train": [], "val": [], "test": numbers}))
    (src / "change_captions.json").write_text(json.dumps(
        {f"CLEVR_default_{i:06d}.png": c for i, c in captions.items()}))


def test_clevr_change_split_values_are_image_numbers(tmp_path):
    splits = json.loads((REAL / "clevr_change" / "splits_first50.json").read_text())
    numbers = splits["test"][:4]  # real values, far apart: the folder holds only these renders
    captions = {i: [f"the cube {i} turned red", "the tiny object became brown", "  "] for i in numbers}
    src = tmp_path / "clevr"
    _clevr_release(src, numbers, captions)
    samples = convert_clevr_change(src, tmp_path / "out", "test")
    assert [s.id for s in samples] == [f"{i:06d}" for i in numbers]
    s = samples[0]
    assert [p.name for p in _resolve(tmp_path / "out", s)] == [f"CLEVR_default_{numbers[0]:06d}.png",
                                                              f"CLEVR_semantic_{numbers[0]:06d}.png"]
    assert s.output == ". ".join(captions[numbers[0]])  # DEMON's joined response, as stored
    assert s.references == (f"the cube {numbers[0]} turned red", "the tiny object became brown")
    (src / "images" / f"CLEVR_default_{numbers[2]:06d}.png").unlink()
    with pytest.raises(DataError, match=rf"image number {numbers[2]}: .*CLEVR_default_{numbers[2]:06d}\.png not found"):
        convert_clevr_change(src, tmp_path / "out", "test")


def test_clevr_change_joined_reference_matches_demons_example(tmp_path):
    response = _demon_response("CLEVR-Change")
    src = tmp_path / "clevr"
    _clevr_release(src, [6626], {6626: response.split(". ")})
    [s] = convert_clevr_change(src, tmp_path / "out", "test")
    assert s.id == "006626" and s.output == response


@pytest.mark.parametrize("dataset", ["aesop", "vist", "clevr_change", "nico", "demon", "passthrough"])
def test_prepare_rejects_options_a_converter_does_not_use(tmp_path, dataset):
    proc = subprocess.run([sys.executable, "-m", "sam_mllm.data.prepare", dataset, "--src", str(tmp_path),
                           "--out", str(tmp_path / "out"), "--images", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{dataset} does not use --images" in proc.stderr

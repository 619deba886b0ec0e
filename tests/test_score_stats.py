"""Scoring other models' prediction files, the side-by-side page, and dataset statistics (Table 1)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import write_dataset
from PIL import Image

from sam_mllm.config import load_config
from sam_mllm.data.stats import dataset_stats, to_markdown
from sam_mllm.data.stats import main as stats_main
from sam_mllm.evaluate import evaluate, read_jsonl
from sam_mllm.metrics import score
from sam_mllm.score import PredictionFileError, read_predictions, run
from sam_mllm.score import main as score_main


def _eval_overrides(data: Path, out: Path) -> list[str]:
    return ["model.dims=tiny", f"data_root={data.parent}", f"output_dir={out}", "eval.batch_size=4",
            f"eval.datasets=[{{name: tiny, task: group_captioning, path: {data.name}}}]",
            "generation.max_new_tokens=4", "generation.num_beams=1"]


def test_scoring_a_released_pred_json_equals_scoring_by_evaluate(tmp_path):
    data = tmp_path / "tiny"
    samples = write_dataset(data, n=4)
    evaluate(load_config(None, _eval_overrides(data, tmp_path / "run")))
    ours = tmp_path / "run" / "tiny"
    preds = read_jsonl(ours / "predictions.jsonl")
    # The released test.py's pred.json: sample_id / pred_response / gt_response, here in another order
    # and with the ids written as strings.
    released = [{"sample_id": str(p["id"]), "pred_response": p["prediction"], "gt_response": s["output"]}
                for p, s in zip(preds, samples)][::-1]
    (tmp_path / "pred.json").write_text(json.dumps(released, indent=4))
    score_main([str(tmp_path / "pred.json"), "--dataset", str(data), "--task", "group_captioning",
                "--out", str(tmp_path / "scored"), "--names", "imported", "eval.protocol=paper"])
    scored = tmp_path / "scored" / "imported"
    assert json.loads((scored / "metrics.json").read_text()) == json.loads((ours / "metrics.json").read_text())
    assert read_jsonl(scored / "per_sample.jsonl") == read_jsonl(ours / "per_sample.jsonl")
    # Our own predictions.jsonl (and the folder holding it) score the same way.
    cfg = load_config(None, [f"data_root={tmp_path}", "eval.check_images=false"])
    again = run(cfg, [ours], str(data), "group_captioning", tmp_path / "scored2", ["ours"])
    metrics = json.loads((ours / "metrics.json").read_text())
    assert again["ours"] == {k: metrics[k] for k in again["ours"] if k != "num_bad_samples"} | {"num_bad_samples": 0}


def test_released_file_without_dataset_is_scored_against_its_gt_response(tmp_path):
    records = [{"sample_id": 1, "pred_response": "A red star.", "gt_response": "a red star"},
               {"sample_id": 2, "pred_response": "the blue circle", "gt_response": "a blue square"},
               {"sample_id": 3, "pred_response": "", "gt_response": "green"}]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pred.json").write_text(json.dumps(records))
    cfg = load_config(None, [])
    got = run(cfg, [tmp_path / "m"], None, None, tmp_path / "out")
    want = score([(r["sample_id"], r["pred_response"], [r["gt_response"]]) for r in records]).summary
    assert {k: got["m"][k] for k in want} == want and got["m"]["ROUGE_L"] > 0


def test_prediction_files_that_do_not_fit_fail_naming_the_sample(tmp_path, capsys):
    data = tmp_path / "tiny"
    write_dataset(data, n=3)
    cfg = load_config(None, [f"data_root={tmp_path}"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 0, "prediction": "a"}\n{"id": 1, "prediction": "b"}\n')
    with pytest.raises(PredictionFileError, match=r"1 of 3 samples .* no prediction, e.g. \[2\]"):
        run(cfg, [bad], str(data), "group_captioning", tmp_path / "o")
    bad.write_text('{"id": 0, "prediction": "a"}\n{"id": 1, "prediction": "b"}\n{"id": 9, "prediction": "c"}\n'
                   '{"id": 2, "prediction": "d"}\n')
    with pytest.raises(PredictionFileError, match=r"not in dataset 'tiny'.*\[9\]"):
        run(cfg, [bad], str(data), "group_captioning", tmp_path / "o")
    bad.write_text('{"id": 0, "text": "a"}\n')
    with pytest.raises(PredictionFileError, match=r"record #0: needs one of"):
        read_predictions(bad)
    bad.write_text('{"id": 0, "prediction": "a"}\n{"id": 0, "prediction": "b"}\n')
    with pytest.raises(PredictionFileError, match=r"record #1: id 0 already used by record #0"):
        read_predictions(bad)
    with pytest.raises(SystemExit) as exit_info:
        score_main([str(bad), "--dataset", str(data)])
    assert exit_info.value.code == 2 and "give its --task" in capsys.readouterr().err


def _two_runs(tmp_path: Path) -> tuple[Path, Path, Path]:
    data = tmp_path / "tiny"
    samples = write_dataset(data, n=5)
    good = [{"id": s["id"], "prediction": s["output"]} for s in samples]
    poor = [{"id": s["id"], "prediction": s["output"] if s["id"] % 2 else "a blue circle ."} for s in samples]
    for name, recs in (("sam", good), ("blip2", poor)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return data, tmp_path / "blip2", tmp_path / "sam"


def test_side_by_side_page(tmp_path):
    data, first, second = _two_runs(tmp_path)
    cfg = load_config(None, [f"data_root={tmp_path}"])
    results = run(cfg, [first, second], str(data), "group_captioning", tmp_path / "out")
    assert list(results) == ["blip2", "sam"] and results["sam"]["CIDEr"] > results["blip2"]["CIDEr"]
    page = (tmp_path / "out" / "side_by_side.html").read_text()
    distinct = {p for s in json.loads((data / "annotations.json").read_text()) for p in s["img_list"]}
    assert page.count("data:image/jpeg;base64,") == len(distinct)  # thumbnails once, not once per model
    assert "Δ CIDEr (sam − blip2)" in page and page.count("a blue circle .") == 3
    per = {r["id"]: r["scores"]["CIDEr"] for r in read_jsonl(tmp_path / "out" / "sam" / "per_sample.jsonl")}
    per_b = {r["id"]: r["scores"]["CIDEr"] for r in read_jsonl(tmp_path / "out" / "blip2" / "per_sample.jsonl")}
    assert f"{per[0] - per_b[0]:+.2f}" in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_side_by_side_page_in_a_real_browser(tmp_path):
    data, first, second = _two_runs(tmp_path)
    cfg = load_config(None, [f"data_root={tmp_path}"])
    run(cfg, [first, second], str(data), "group_captioning", tmp_path / "out")
    page = tmp_path / "out" / "side_by_side.html"
    delta_col = 6  # id, images, instruction, references, blip2, sam, Δ
    proc = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--dump-dom", f"{page.as_uri()}#sort={delta_col}-desc"],
                          capture_output=True, text=True, timeout=120)
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    assert 'data-ready="1"' in proc.stdout
    # The script sorted the rows by the difference, largest first: the samples where blip2 was wrong.
    import re

    deltas = [float(v) for v in re.findall(r"class=\"num (?:pos|neg|)\" data-v=\"([-0-9.e]+)\"", proc.stdout)]
    assert len(deltas) == 5 and deltas == sorted(deltas, reverse=True) and deltas[0] > 0


def test_dataset_statistics(tmp_path):
    data = tmp_path / "tiny"
    samples = write_dataset(data, n=6, max_images=3)
    s = dataset_stats(data)
    assert s.samples == 6 and (s.images_min, s.images_max) == (1, 3) and s.images_mean == 2.0
    assert s.distinct_images == 12 and s.distinct_instructions == 1 and s.instruction_words == 5
    assert s.answer_words == 3 and s.answer_vocabulary == len({w for x in samples for w in x["output"].lower().split()
                                                                if w != "."})
    assert s.similarity_samples == 4 and 0 < s.image_similarity < 1

    # Pairs of one picture with itself correlate 1, with its negative -1.
    pairs = tmp_path / "pairs"
    (pairs / "im").mkdir(parents=True)
    arr = np.random.default_rng(0).integers(0, 256, (40, 40, 3)).astype(np.uint8)
    Image.fromarray(arr).save(pairs / "im" / "a.png")
    Image.fromarray(255 - arr).save(pairs / "im" / "b.png")
    recs = [{"id": 0, "img_list": ["im/a.png", "im/a.png"], "instruction": "same ?", "output": "yes"},
            {"id": 1, "img_list": ["im/a.png", "im/b.png"], "instruction": "same ?", "output": "no"}]
    (pairs / "annotations.json").write_text(json.dumps(recs))
    p = dataset_stats(pairs)
    assert p.image_similarity == pytest.approx(0.0, abs=0.02)  # (1 + -1) / 2
    assert dataset_stats(pairs, similarity_samples=1).image_similarity == pytest.approx(1.0)
    table = to_markdown([s, dataset_stats(pairs, images=False)])
    assert table.splitlines()[2].startswith("| tiny | 6 | 2.00 (1–3) | 12 |") and "| – |" in table


def test_stats_cli(tmp_path, capsys):
    write_dataset(tmp_path / "tiny", n=3)
    stats_main([str(tmp_path / "tiny"), "--no-images", "--out", str(tmp_path / "t.md")])
    assert "| tiny | 3 |" in capsys.readouterr().out and (tmp_path / "t.md").is_file()
    with pytest.raises(SystemExit) as exit_info:
        stats_main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and "annotations file not found" in capsys.readouterr().err

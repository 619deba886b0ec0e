"""python -m sam_mllm.evaluate on a tiny model: outputs, resumption, several processes, the notebook API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_dataset
from PIL import Image

from sam_mllm.config import load_config
from sam_mllm.evaluate import evaluate, read_jsonl

REPO = Path(__file__).resolve().parents[1]


def _overrides(data: Path, out: Path, extra: list[str] = ()) -> list[str]:
    return ["model.dims=tiny", f"data_root={data.parent}", f"output_dir={out}", "eval.batch_size=3",
            f"eval.datasets=[{{name: tiny, task: group_captioning, path: {data.name}}}]",
            "generation.max_new_tokens=6", "generation.num_beams=2", *extra]


def _cli(module: str, args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, **kw)


def test_evaluate_writes_predictions_metrics_and_report(tmp_path):
    data = tmp_path / "tiny"
    samples = write_dataset(data, n=7)
    cfg = load_config(None, _overrides(data, tmp_path / "run"))
    results = evaluate(cfg)
    out = tmp_path / "run" / "tiny"
    preds = read_jsonl(out / "predictions.jsonl")
    assert [p["id"] for p in preds] == [s["id"] for s in samples]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"ROUGE_L", "CIDEr", "BLEU_4", "num_samples", "bad_samples"}
    assert metrics["num_samples"] == 7 and results["tiny"]["CIDEr"] == metrics["CIDEr"]
    per_sample = read_jsonl(out / "per_sample.jsonl")
    assert len(per_sample) == 7 and "ROUGE_L" in per_sample[0]["scores"]
    html = (out / "report.html").read_text()
    assert "data:image/jpeg;base64," in html and "shared object" in html


def test_interrupted_run_resumes_to_identical_results(tmp_path):
    data = tmp_path / "tiny"
    write_dataset(data, n=9)
    full = tmp_path / "full"
    evaluate(load_config(None, _overrides(data, full)))
    # A run that died after 4 predictions, in the middle of writing the 5th line.
    part = tmp_path / "part" / "tiny"
    part.mkdir(parents=True)
    lines = (full / "tiny" / "predictions.jsonl").read_text().splitlines(keepends=True)
    (part / "predictions.jsonl").write_text("".join(lines[:4]) + lines[4][:7])
    evaluate(load_config(None, _overrides(data, tmp_path / "part")))
    assert (part / "predictions.jsonl").read_text() == (full / "tiny" / "predictions.jsonl").read_text()
    assert json.loads((part / "metrics.json").read_text()) == json.loads((full / "tiny" / "metrics.json").read_text())


def test_sigkill_half_way_then_rerun(tmp_path):
    data = tmp_path / "tiny"
    write_dataset(data, n=24)
    over = _overrides(data, tmp_path / "killed", ["eval.batch_size=1", "generation.max_new_tokens=24",
                                                   "generation.min_new_tokens=24"])
    proc = subprocess.Popen([sys.executable, "-m", "sam_mllm.evaluate", *over], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    preds = tmp_path / "killed" / "tiny" / "predictions.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if preds.is_file() and len(read_jsonl(preds)) >= 6:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    killed_at = len(read_jsonl(preds))
    assert proc.returncode == -signal.SIGKILL and 6 <= killed_at < 24
    assert _cli("sam_mllm.evaluate", over).returncode == 0
    assert _cli("sam_mllm.evaluate", _overrides(data, tmp_path / "clean", ["eval.batch_size=1",
                "generation.max_new_tokens=24", "generation.min_new_tokens=24"])).returncode == 0
    assert preds.read_text() == (tmp_path / "clean" / "tiny" / "predictions.jsonl").read_text()
    assert (json.loads((tmp_path / "killed" / "tiny" / "metrics.json").read_text())
            == json.loads((tmp_path / "clean" / "tiny" / "metrics.json").read_text()))


def test_two_processes_give_the_same_metrics(tmp_path):
    data = tmp_path / "tiny"
    write_dataset(data, n=7)
    one = _cli("sam_mllm.evaluate", _overrides(data, tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    # `--cpu --num_processes 2` starts ONE process in accelerate 1.x (it needs MPI for more);
    # `--multi_gpu` goes through torchrun, and without CUDA our Accelerator uses gloo on the CPU.
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "-m", "sam_mllm.evaluate", *_overrides(data, tmp_path / "two")], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((tmp_path / "one" / "tiny" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "tiny" / "metrics.json").read_text())
    assert m1 == m2
    p2 = read_jsonl(tmp_path / "two" / "tiny" / "predictions.jsonl")
    assert sorted(p["id"] for p in p2) == list(range(7))  # each sample exactly once
    assert not list((tmp_path / "two" / "tiny").glob("predictions.rank*.jsonl"))


@pytest.mark.parametrize("problem", ["missing_image", "bad_id"])
def test_bad_samples_fail_clearly_or_are_skipped(tmp_path, problem):
    data = tmp_path / "tiny"
    samples = write_dataset(data, n=5)
    if problem == "missing_image":
        samples[2]["img_list"][0] = "images/nope.png"
    else:
        samples[3]["id"] = samples[1]["id"]
    (data / "annotations.json").write_text(json.dumps(samples))
    bad = _cli("sam_mllm.evaluate", _overrides(data, tmp_path / "bad"))
    assert bad.returncode != 0
    assert "annotations.json" in bad.stderr and ("nope.png" in bad.stderr or "duplicate" in bad.stderr.lower())
    assert "Traceback" not in bad.stderr
    ok = _cli("sam_mllm.evaluate", _overrides(data, tmp_path / "skip", ["eval.skip_bad=true"]))
    assert ok.returncode == 0, ok.stderr[-2000:]
    metrics = json.loads((tmp_path / "skip" / "tiny" / "metrics.json").read_text())
    assert metrics["num_samples"] == 4 and len(metrics["bad_samples"]) == 1


def test_notebook_api(tmp_path):
    import sam_mllm

    pipe = sam_mllm.load_model(overrides=["model.dims=tiny", "generation.max_new_tokens=5", "generation.num_beams=1"])
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (32, 32), (10, 10, 200))]
    text = pipe.generate(images=images, prompt="what is the shared object ?")
    assert isinstance(text, str)
    path = tmp_path / "a.png"
    images[0].save(path)
    assert isinstance(pipe.generate(images=[path], prompt="what is in the image ?"), str)
    with pytest.raises(ValueError, match="at least one image"):
        pipe.generate(images=[], prompt="x")

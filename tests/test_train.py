"""python -m sam_mllm.train on a tiny model (CPU): learning, exact resume, feature cache, two processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import train_overrides, write_dataset
from safetensors.torch import load_file

from sam_mllm.config import ConfigError, load_config
from sam_mllm.evaluate import read_jsonl
from sam_mllm.models import build_model
from sam_mllm.train import latest_checkpoint, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "tiny"
    write_dataset(root, n=10)
    return root


def test_loss_goes_down_and_frozen_weights_do_not_move(data, tmp_path):
    cfg = load_config(None, train_overrides(data, tmp_path / "run", ["train.max_steps=30"]))
    torch.manual_seed(cfg.seed)
    before = build_model(cfg.model).state_dict()
    final = train(cfg)
    log = [r for r in read_jsonl(tmp_path / "run" / "log.jsonl") if "loss" in r]
    assert len(log) == 30
    first, last = sum(r["loss"] for r in log[:3]) / 3, sum(r["loss"] for r in log[-3:]) / 3
    assert last < first - 0.2, (first, last)  # a random frozen LLM: only a little to gain
    torch.manual_seed(cfg.seed)
    after = build_model(load_config(None, train_overrides(data, tmp_path / "run", [f"model.checkpoint={final}"])).model)
    trained = set(load_file(str(final / "adapter.safetensors")))
    assert trained == {"patch_weight.weight", "patch_weight.bias", "w_in.weight", "w_in.bias", "w_out.weight",
                       "w_out.bias", "language_projection.weight", "language_projection.bias"}
    for name, value in after.state_dict().items():
        if name in trained:
            assert not torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, before[name]), name  # frozen: bit-identical
    assert (tmp_path / "run" / "curves.png").is_file()


def test_sigkill_and_resume_is_bit_identical(data, tmp_path):
    steps = ["train.max_steps=24", "train.save_every=2"]
    clean = subprocess.run([sys.executable, "-m", "sam_mllm.train", *train_overrides(data, tmp_path / "clean", steps)],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-2000:]
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "sam_mllm.train", *train_overrides(data, run, [*steps, "train.resume=latest"])]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        ckpt = latest_checkpoint(run)
        if ckpt is not None and ckpt.name >= "step_0000004":
            time.sleep(0.1)  # somewhere inside a later step
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "final").exists()
    resumed = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    a = load_file(str(tmp_path / "clean" / "final" / "adapter.safetensors"))
    b = load_file(str(run / "final" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps_logged = [r["step"] for r in read_jsonl(run / "log.jsonl") if "loss" in r]
    assert steps_logged == list(range(1, 25))  # no duplicated or missing log lines


def test_feature_cache_gives_the_pixel_trajectory_and_is_reused(data, tmp_path):
    base = ["train.max_steps=6", "train.augment=none"]
    train(load_config(None, train_overrides(data, tmp_path / "pixels", base)))
    cache = tmp_path / "cache"
    train(load_config(None, train_overrides(data, tmp_path / "cached", [*base, f"train.feature_cache={cache}"])))
    lp = [r["loss"] for r in read_jsonl(tmp_path / "pixels" / "log.jsonl") if "loss" in r]
    lc = [r["loss"] for r in read_jsonl(tmp_path / "cached" / "log.jsonl") if "loss" in r]
    assert len(lp) == len(lc) == 6
    assert max(abs(x - y) for x, y in zip(lp, lc)) <= 1e-5
    shards = sorted(cache.rglob("*.npy"))
    assert len(shards) == 1
    stamp = shards[0].stat().st_mtime_ns
    train(load_config(None, train_overrides(data, tmp_path / "again", [*base, f"train.feature_cache={cache}"])))
    assert sorted(cache.rglob("*.npy")) == shards and shards[0].stat().st_mtime_ns == stamp


def test_feature_cache_refuses_random_augmentation(data, tmp_path):
    cfg = load_config(None, train_overrides(data, tmp_path / "x", ["train.max_steps=1",
                                                               f"train.feature_cache={tmp_path / 'c'}"]))
    with pytest.raises(ConfigError, match="train.augment=none"):
        train(cfg)


def test_two_processes_train_identically_and_only_main_writes(data, tmp_path):
    run = tmp_path / "ddp"
    # `--cpu --num_processes 2` starts ONE process in accelerate 1.x (it needs MPI for more);
    # `--multi_gpu` goes through torchrun, and without CUDA our Accelerator uses gloo on the CPU.
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "-m", "sam_mllm.train", *train_overrides(data, run, ["train.max_steps=4"])],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = read_jsonl(run / "log.jsonl")
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]  # one writer
    assert log[-1]["replicas_identical"] is True
    single = tmp_path / "single"
    assert subprocess.run([sys.executable, "-m", "sam_mllm.train", *train_overrides(data, single, ["train.max_steps=4"])],
                          cwd=REPO, capture_output=True, timeout=600).returncode == 0
    a = load_file(str(run / "final" / "adapter.safetensors"))
    b = load_file(str(single / "final" / "adapter.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # same samples per step, any process count


def test_trained_checkpoint_loads_in_evaluate_and_notebook(data, tmp_path):
    final = train(load_config(None, train_overrides(data, tmp_path / "run", ["train.max_steps=2"])))
    import sam_mllm

    pipe = sam_mllm.load_model(checkpoint=final, overrides=["generation.max_new_tokens=4", "generation.num_beams=1"])
    assert torch.equal(pipe.model.w_in.weight, load_file(str(final / "adapter.safetensors"))["w_in.weight"])
    from PIL import Image

    assert isinstance(pipe.generate(images=[Image.open(next((data / "images").iterdir()))],
                                    prompt="what is the shared object ?"), str)
    ev = subprocess.run([sys.executable, "-m", "sam_mllm.evaluate", "--config", str(final / "config.yaml"),
                         f"model.checkpoint={final}", f"output_dir={tmp_path / 'ev'}",
                         f"eval.datasets=[{{name: tiny, task: group_captioning, path: {data.name}}}]",
                         "generation.max_new_tokens=4", "generation.num_beams=1"],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert (tmp_path / "ev" / "tiny" / "metrics.json").is_file()


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    from sam_mllm.models.sam import SAMModel
    from sam_mllm.train import TrainingError

    real_forward = SAMModel.forward
    calls = {"n": 0}

    def forward(self, batch):
        out = real_forward(self, batch)
        calls["n"] += 1
        if calls["n"] > 8:  # 2 micro-batches per step: step 5 goes bad
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(SAMModel, "forward", forward)
    cfg = load_config(None, train_overrides(data, tmp_path / "nan", ["train.max_steps=8", "train.save_every=2"]))
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 5 .*last good checkpoint is .*step_0000004"):
        train(cfg)
    ckpt = latest_checkpoint(tmp_path / "nan")
    assert ckpt.name == "step_0000004"
    state = load_file(str(ckpt / "adapter.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())

"""Experiment trackers through accelerate (train.log_with), offline: TensorBoard and wandb."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_dataset

from sam_mllm.config import ConfigError, load_config
from sam_mllm.evaluate import read_jsonl
from sam_mllm.train import train


def _cfg(tmp_path: Path, trackers: str):
    data = tmp_path / "tiny"
    write_dataset(data, n=4)
    return load_config(None, [
        "model.dims=tiny", f"data_root={tmp_path}", f"output_dir={tmp_path / 'run'}",
        "train.datasets=[{name: tiny, task: group_captioning, path: tiny}]", "train.warmup_steps=1",
        "train.global_batch_size=2", "train.micro_batch_size=2", "train.log_every=1", "train.max_steps=2",
        "train.save_every=2", f"train.log_with={trackers}"])


def test_tensorboard_and_wandb_offline_receive_the_logged_scalars(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(_cfg(tmp_path, "[tensorboard,wandb]"))
    run = tmp_path / "run"
    logged = [r for r in read_jsonl(run / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2] and (run / "curves.png").is_file()  # still written

    events = EventAccumulator(str(next((run / "trackers").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [1, 2]
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in logged], rel=1e-6)

    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


def test_unknown_or_missing_tracker_is_a_config_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'.*tensorboard"):
        train(_cfg(tmp_path, "[tensorbord]"))
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ConfigError, match="'mlflow' needs its package"):
        train(_cfg(tmp_path, "[mlflow]"))

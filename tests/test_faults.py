"""Faults and hostile inputs (issue 11): each test injects one and checks that nothing else is lost.

docs/RELIABILITY.md lists every guarantee with the test here (or in test_train.py / test_evaluate.py)
that proves it.
"""

from __future__ import annotations

import builtins
import errno
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_dataset
from safetensors.torch import load_file

from sam_mllm.config import load_config
from sam_mllm.evaluate import read_jsonl
from sam_mllm.train import TrainingError, latest_checkpoint, train

REPO = Path(__file__).resolve().parents[1]


class _RunsCode:
    """Unpickling this calls ``exec``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _train_overrides(data: Path, out: Path, extra: list[str] = ()) -> list[str]:
    return ["model.dims=tiny", f"data_root={data.parent}", f"output_dir={out}",
            f"train.datasets=[{{name: tiny, task: group_captioning, path: {data.name}}}]",
            "train.lr=1e-3", "train.warmup_steps=1", "train.global_batch_size=2", "train.micro_batch_size=2",
            "train.log_every=1", "train.save_every=1", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "tiny"
    write_dataset(root, n=4, max_images=2)
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A 2-step run with checkpoints step_0000001 and step_0000002."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(load_config(None, _train_overrides(data, run, ["train.max_steps=2"])))
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# ----------------------------------------------------------------- 1. no code execution from files


def test_crafted_resume_state_is_refused_without_running_it(data, trained, tmp_path):
    run = _copy(trained, tmp_path)
    ckpt = run / "checkpoints" / "step_0000002"
    marker = tmp_path / "ran.txt"
    torch.save({"step": 2, "optimizer": _RunsCode(marker), "rng": {}}, ckpt / "state.pt")
    cfg = load_config(None, _train_overrides(data, run, ["train.max_steps=3", f"train.resume={ckpt}"]))
    with pytest.raises(TrainingError, match=r"state\.pt: refusing to load: .*could run code"):
        train(cfg)
    assert not marker.exists()
    # resume=latest never picks it: it falls back to the checkpoint before, which is intact.
    assert latest_checkpoint(run) == run / "checkpoints" / "step_0000001"
    assert not marker.exists()


def test_resume_state_holds_only_tensors_and_plain_data(trained):
    state = torch.load(trained / "checkpoints" / "step_0000002" / "state.pt", weights_only=True)
    assert state["step"] == 2 and set(state["rng"]) >= {"python", "numpy", "torch"}


def test_rng_states_round_trip():
    import random

    import numpy as np

    from sam_mllm.resume import rng_state, set_rng_state

    saved = rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)), random.gauss(0, 1), np.random.randn())
    set_rng_state(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1)), random.gauss(0, 1),
            np.random.randn()) == a


def test_lavis_converter_refuses_a_pickle_payload_in_one_line(tmp_path, capsys):
    marker = tmp_path / "ran.txt"
    src = tmp_path / "sam.pth"
    torch.save({"model": {"llm_proj.weight": torch.zeros(2, 2)}, "extra": _RunsCode(marker)}, src)
    spec = importlib.util.spec_from_file_location("convert_lavis", REPO / "scripts" / "convert_lavis_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--src", str(src), "--out", str(tmp_path / "out")])
    message = str(exit_info.value.code)
    assert message.startswith(f"error: {src}: refusing to load") and "\n" not in message
    assert "could run code" in message and "exec" in message
    assert not marker.exists() and not (tmp_path / "out").exists()


# --------------------------------------------------------- 2. partial checkpoints never block a resume


def test_partial_and_corrupt_checkpoints_are_skipped_and_cleaned(data, trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    ckpts = run / "checkpoints"
    # A save killed while writing state.pt: a .tmp folder with a cut-off file ...
    shutil.copytree(ckpts / "step_0000002", ckpts / "step_0000003.tmp")
    state = (ckpts / "step_0000003.tmp" / "state.pt").read_bytes()
    (ckpts / "step_0000003.tmp" / "state.pt").write_bytes(state[: len(state) // 2])
    assert latest_checkpoint(run) == ckpts / "step_0000002"
    # ... and a complete-looking folder whose state file was damaged later (bad disk, bad copy).
    shutil.copytree(ckpts / "step_0000002", ckpts / "step_0000004")
    (ckpts / "step_0000004" / "state.pt").write_bytes(state[: len(state) // 3])
    assert latest_checkpoint(run) == ckpts / "step_0000002"
    assert "skipping checkpoint" in capsys.readouterr().out
    final = train(load_config(None, _train_overrides(data, run, ["train.max_steps=3", "train.resume=latest"])))
    out = capsys.readouterr().out
    assert f"skipping checkpoint {ckpts / 'step_0000004'}: " in out
    assert f"resumed from {ckpts / 'step_0000002'} at step 2" in out
    assert not list(ckpts.glob("*.tmp"))  # the stale save was removed
    assert (final / "adapter.safetensors").is_file()
    assert [r["step"] for r in read_jsonl(run / "log.jsonl") if "loss" in r] == [1, 2, 3]


def test_disk_full_while_saving_names_the_checkpoint_and_keeps_the_earlier_ones(data, tmp_path, monkeypatch):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "step_0000002" in str(getattr(f, "name", f)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "full"
    with pytest.raises(TrainingError, match=r"could not write checkpoint .*step_0000002: .*No space left on device"):
        train(load_config(None, _train_overrides(data, run, ["train.max_steps=3"])))
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000001"]  # no half-written folder left
    assert latest_checkpoint(run) == ckpts / "step_0000001"  # it loads: resume=latest continues from it


# -------------------------------------------------- 3. non-finite gradients never reach a checkpoint


def test_nan_gradient_with_finite_loss_stops_before_the_step(data, tmp_path, monkeypatch):
    from sam_mllm.models.sam import SAMModel

    real_forward = SAMModel.forward
    calls = {"n": 0}

    def forward(self, batch):
        out = real_forward(self, batch)
        calls["n"] += 1
        if calls["n"] == 2:  # step 2: the loss stays finite, the gradient of w_in is NaN
            out.loss = out.loss + _nan_grad(self.w_in.weight)
        return out

    monkeypatch.setattr(SAMModel, "forward", forward)
    run = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"non-finite gradients \(w_in\.weight\) at step 2 .*"
                                            r"last good checkpoint is .*step_0000001\.$"):
        train(load_config(None, _train_overrides(data, run, ["train.max_steps=4"])))
    saved = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in saved] == ["step_0000001"]
    assert all(torch.isfinite(v).all() for v in load_file(str(saved[0] / "adapter.safetensors")).values())


def _nan_grad(weight: torch.Tensor) -> torch.Tensor:
    """0 in the forward pass; a NaN gradient for ``weight`` in the backward pass."""

    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.shape = x.shape
            return x.new_zeros(())

        @staticmethod
        def backward(ctx, grad):
            return torch.full(ctx.shape, float("nan"))

    return F.apply(weight)


# ------------------------------------------ 4. predictions are never reused for another setup


def _eval_overrides(data: Path, out: Path, extra: list[str] = ()) -> list[str]:
    return ["model.dims=tiny", f"data_root={data.parent}", f"output_dir={out}", "eval.batch_size=4",
            f"eval.datasets=[{{name: tiny, task: group_captioning, path: {data.name}}}]",
            "generation.max_length=5", "generation.num_beams=1", *extra]


@pytest.fixture(scope="module")
def evaluated(data, tmp_path_factory):
    from sam_mllm.evaluate import evaluate

    out = tmp_path_factory.mktemp("evaluated") / "ev"
    evaluate(load_config(None, _eval_overrides(data, out)))
    return out


def test_predictions_of_another_setup_are_refused_or_restarted(data, trained, evaluated, tmp_path):
    from sam_mllm.evaluate import evaluate
    from sam_mllm.provenance import OutputFolderError

    out = tmp_path / "ev"
    shutil.copytree(evaluated, out)
    before = (out / "tiny" / "predictions.jsonl").read_text()
    ckpt = f"model.checkpoint={trained / 'final' / 'adapter.safetensors'}"
    with pytest.raises(OutputFolderError, match=r"tiny: its predictions were made with a different "
                                                r"checkpoint_files\.checkpoint, trainable_weights .*eval\.restart=true"):
        evaluate(load_config(None, _eval_overrides(data, out, [ckpt])))
    with pytest.raises(OutputFolderError, match=r"different generation\.num_beams"):
        evaluate(load_config(None, _eval_overrides(data, out, ["generation.num_beams=2"])))
    assert (out / "tiny" / "predictions.jsonl").read_text() == before  # refused: nothing touched
    edited = json.loads((data / "annotations.json").read_text())
    edited[0]["output"] = "a blue star ."
    data2 = tmp_path / "tiny"
    shutil.copytree(data, data2)
    (data2 / "annotations.json").write_text(json.dumps(edited))
    with pytest.raises(OutputFolderError, match=r"different annotations "):
        evaluate(load_config(None, _eval_overrides(data2, out)))
    evaluate(load_config(None, _eval_overrides(data, out, [ckpt, "eval.restart=true"])))
    fresh = tmp_path / "fresh"
    evaluate(load_config(None, _eval_overrides(data, fresh, [ckpt])))
    assert (out / "tiny" / "predictions.jsonl").read_text() == (fresh / "tiny" / "predictions.jsonl").read_text()
    assert json.loads((out / "tiny" / "metrics.json").read_text()) == json.loads(
        (fresh / "tiny" / "metrics.json").read_text())


def test_second_evaluation_of_a_folder_names_the_lock_holder(data, evaluated, tmp_path):
    import os

    from sam_mllm.evaluate import evaluate
    from sam_mllm.provenance import FolderLock, OutputFolderError

    out = tmp_path / "ev"
    shutil.copytree(evaluated, out)
    with FolderLock(out):  # as a running evaluation holds it
        with pytest.raises(OutputFolderError, match=rf"ev is being written by pid {os.getpid()} on .*another output_dir"):
            evaluate(load_config(None, _eval_overrides(data, out)))
    evaluate(load_config(None, _eval_overrides(data, out)))  # released: the folder is usable again


def test_prediction_line_without_prediction_is_repaired(data, evaluated, tmp_path, capsys):
    from sam_mllm.evaluate import evaluate

    out = tmp_path / "ev"
    shutil.copytree(evaluated, out)
    preds = out / "tiny" / "predictions.jsonl"
    lines = preds.read_text().splitlines(keepends=True)
    preds.write_text("".join(lines[:2]) + json.dumps({"id": 2}) + "\n")
    evaluate(load_config(None, _eval_overrides(data, out)))
    assert "cut off an incomplete or malformed line" in capsys.readouterr().out
    assert preds.read_text() == "".join(lines)
    assert json.loads((out / "tiny" / "metrics.json").read_text()) == json.loads(
        (evaluated / "tiny" / "metrics.json").read_text())


@pytest.mark.parametrize("name", ["../escape", "a/b", ".."])
def test_dataset_name_cannot_leave_the_output_folder(data, tmp_path, name):
    from sam_mllm.data.schema import DataError
    from sam_mllm.evaluate import evaluate

    over = _eval_overrides(data, tmp_path / "out")
    over[4] = f"eval.datasets=[{{name: {json.dumps(name)}, task: group_captioning, path: {data.name}}}]"
    with pytest.raises(DataError, match=r"must be a plain folder name"):
        evaluate(load_config(None, over))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not (tmp_path / "out" / "a").exists()

"""Faults and hostile inputs (issue 11): each test injects one and checks that nothing else is lost.

docs/RELIABILITY.md lists every guarantee with the test here (or in test_train.py / test_evaluate.py)
that proves it.
"""

from __future__ import annotations

import builtins
import errno
import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_overrides, write_dataset
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
    return train_overrides(data, out, extra, warmup=1, batch=2, save_every=1)


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


def test_lavis_converter_refuses_a_pickle_payload_in_one_line(tmp_path, monkeypatch):
    marker = tmp_path / "ran.txt"
    src = tmp_path / "sam.pth"
    torch.save({"model": {"llm_proj.weight": torch.zeros(2, 2)}, "extra": _RunsCode(marker)}, src)
    monkeypatch.setattr(sys, "argv", ["convert_lavis_checkpoint.py", "--src", str(src), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_info:  # as from the command line
        runpy.run_path(str(REPO / "scripts" / "convert_lavis_checkpoint.py"), run_name="__main__")
    message = str(exit_info.value.code)
    assert message.startswith(f"error: {src}: refusing to load") and "\n" not in message
    assert "could run code" in message and "exec" in message
    assert not marker.exists() and not (tmp_path / "o").exists()


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
            "generation.max_new_tokens=5", "generation.num_beams=1", *extra]


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


def test_scored_predictions_are_not_taken_for_a_models(data, evaluated, tmp_path):
    from sam_mllm.evaluate import evaluate, load_eval_set
    from sam_mllm.provenance import OutputFolderError
    from sam_mllm.score import score_file

    cfg = load_config(None, _eval_overrides(data, tmp_path / "ev"))
    other = tmp_path / "other.jsonl"  # e.g. the released model's predictions
    other.write_text("".join(json.dumps({"id": s.id, "prediction": "a red square ."}) + "\n"
                             for s in load_eval_set(cfg, cfg.eval.datasets[0]).samples))
    score_file(cfg, other, load_eval_set(cfg, cfg.eval.datasets[0]), tmp_path / "ev" / "tiny")
    with pytest.raises(OutputFolderError, match=r"different .*scored_file"):
        evaluate(cfg)


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


# ------------------------------------- 5. one image loader; the paper's pixels by default


def _odd_images(folder: Path) -> dict[str, str]:
    """An EXIF-rotated JPEG, a half-transparent PNG, a 16-bit PNG and a two-frame GIF."""
    import numpy as np
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rotated = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    rotated.save(folder / "images" / "rotated.jpg", exif=exif.tobytes())
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :8] = (10, 200, 10, 0)  # transparent, with a stored green
    rgba[:, 8:] = (200, 10, 10, 255)
    Image.fromarray(rgba).save(folder / "images" / "alpha.png")
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(folder / "images" / "deep.png")
    frames = [Image.new("RGB", (16, 16), c) for c in ((0, 0, 250), (250, 250, 0))]
    frames[0].save(folder / "images" / "anim.gif", save_all=True, append_images=frames[1:])
    return {k: f"images/{k}.{ext}" for k, ext in (("rotated", "jpg"), ("alpha", "png"), ("deep", "png"),
                                                  ("anim", "gif"))}


def test_released_mode_gives_the_released_codes_pixels_and_warns_once(tmp_path):
    import warnings

    import numpy as np
    from PIL import Image

    from sam_mllm.data.images import ImageTraitWarning, load_image
    from sam_mllm.evaluate import load_eval_set

    images = _odd_images(tmp_path / "odd")
    samples = [{"id": i, "img_list": [p], "instruction": "what is in the image ?", "output": "a square ."}
               for i, p in enumerate(images.values())]
    (tmp_path / "odd" / "annotations.json").write_text(json.dumps(samples))
    for rel in images.values():  # exactly what the released code fed the model
        assert np.array_equal(np.asarray(load_image(tmp_path / "odd" / rel)),
                              np.asarray(Image.open(tmp_path / "odd" / rel).convert("RGB")))
    cfg = load_config(None, [f"data_root={tmp_path}", "model.dims=tiny",
                             "eval.datasets=[{name: odd, task: group_captioning, path: odd}]"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_eval_set(cfg, cfg.eval.datasets[0])
    ours = [w for w in caught if issubclass(w.category, ImageTraitWarning)]
    assert len(ours) == 1
    text = str(ours[0].message)
    assert text.startswith("dataset 'odd': of 4 images, ") and "data.image_mode=upright" in text
    for trait in ("1 with an EXIF rotation", "1 with transparency", "1 with 16 bits", "1 with several frames"):
        assert trait in text


def test_upright_mode_rotates_composites_and_scales(tmp_path):
    import numpy as np

    from sam_mllm.data.images import load_image

    images = _odd_images(tmp_path)
    up = {k: np.asarray(load_image(tmp_path / p, mode="upright")) for k, p in images.items()}
    assert up["rotated"].shape == (40, 20, 3)  # stored 40x20 (w x h), displayed upright as 20x40
    assert (up["alpha"][:, :8] == 255).all() and (up["alpha"][:, 8:] == (200, 10, 10)).all()
    assert (up["deep"] == 128).all()  # 32768 / 65535 of full scale, not clipped to 255
    assert (up["anim"] == (0, 0, 250)).all()  # the first frame (counted by the survey)


def test_report_thumbnails_show_what_the_model_saw(tmp_path):
    import base64
    import io

    from PIL import Image

    from sam_mllm.data.images import load_image
    from sam_mllm.report import _thumbnails

    path = str(tmp_path / _odd_images(tmp_path)["rotated"])
    for mode in ("released", "upright"):
        w, h, data = _thumbnails([path], 32, mode)[path]
        seen = load_image(path, mode=mode)
        assert (w > h) == (seen.width > seen.height)
        assert Image.open(io.BytesIO(base64.b64decode(data))).size == (w, h)
    alpha = str(tmp_path / "images" / "alpha.png")
    thumb = Image.open(io.BytesIO(base64.b64decode(_thumbnails([alpha], 16, "released")[alpha][2])))
    assert thumb.getpixel((2, 8))[1] > 150  # released: the stored green, as the model got it, not white


def test_notebook_api_loads_phone_photos_upright(tmp_path, monkeypatch):
    import sam_mllm
    from sam_mllm.data.processing import ImageTransform

    seen = []
    real_call = ImageTransform.__call__

    def call(self, image, rng=None):
        seen.append(image.size)
        return real_call(self, image, rng)

    monkeypatch.setattr(ImageTransform, "__call__", call)
    path = tmp_path / _odd_images(tmp_path)["rotated"]
    pipe = sam_mllm.load_model(overrides=["model.dims=tiny", "generation.max_new_tokens=2", "generation.num_beams=1"])
    pipe.generate(images=[path], prompt="what is in the image ?")
    from PIL import Image

    pipe.generate(images=[Image.open(path)], prompt="what is in the image ?")
    assert seen == [(20, 40), (20, 40)]  # stored 40x20; its EXIF says it is upright as 20x40


# ------------------------------------ 6. bad inputs: one clear line, and skip_bad skips them


def _one_bad(folder: Path, kind: str) -> list[dict]:
    from PIL import Image

    samples = write_dataset(folder, n=4, max_images=1)
    target = folder / samples[2]["img_list"][0]
    if kind == "truncated":
        target = target.with_suffix(".jpg")
        Image.new("RGB", (64, 64), (200, 30, 30)).save(target, quality=95)
        data = target.read_bytes()
        target.write_bytes(data[: len(data) * 2 // 3])  # cut off where a kill or a bad copy cuts
        samples[2]["img_list"] = [f"images/{target.name}"]
    elif kind == "bomb":
        Image.new("RGB", (120, 120)).save(target)  # over 2 x MAX_IMAGE_PIXELS (lowered by the test)
    elif kind == "directory":
        samples[2]["img_list"] = ["images"]
    elif kind == "empty_reference":
        samples[2]["references"] = ["a red square .", " "]
    (folder / "annotations.json").write_text(json.dumps(samples))
    return samples


@pytest.mark.parametrize("kind, message", [
    ("truncated", r"sample #2 \(id 2\): field 'img_list': unreadable image .*s2_0\.jpg: .*[Tt]runcated"),
    ("bomb", r"sample #2 \(id 2\): field 'img_list': refusing to decode .*s2_0\.png: .*decompression bomb"),
    ("directory", r"sample #2 \(id 2\): field 'img_list': .*images is a directory, not an image file"),
    ("empty_reference", r"sample #2 \(id 2\): field 'references': reference #1 is empty"),
])
def test_bad_inputs_are_named_at_load_time_and_skippable(tmp_path, monkeypatch, kind, message):
    from PIL import Image

    from sam_mllm.data.schema import DataError, read_annotations

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    folder = tmp_path / "tiny"
    _one_bad(folder, kind)
    with pytest.raises(DataError, match=r"annotations\.json: " + message):
        read_annotations(folder / "annotations.json", check_images=True)
    samples, bad = read_annotations(folder / "annotations.json", check_images=True, skip_bad=True)
    assert [s.id for s in samples] == [0, 1, 3] and [(b.index, b.id) for b in bad] == [(2, 2)]


def test_skip_bad_evaluation_survives_a_truncated_jpeg(tmp_path):
    from sam_mllm.evaluate import evaluate

    folder = tmp_path / "tiny"
    _one_bad(folder, "truncated")
    results = evaluate(load_config(None, _eval_overrides(folder, tmp_path / "ev", ["eval.skip_bad=true"])))
    assert results["tiny"]["num_samples"] == 3 and results["tiny"]["num_bad_samples"] == 1


@pytest.mark.parametrize("cache", [False, True])
def test_a_bad_training_image_names_sample_and_annotations(tmp_path, monkeypatch, cache):
    from PIL import Image

    from sam_mllm.data.processing import ImageLoadError
    from sam_mllm.data.schema import DataError

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    folder = tmp_path / "tiny"
    samples = _one_bad(folder, "bomb")
    (folder / samples[1]["img_list"][0]).unlink()
    extra = ["train.max_steps=2", "train.augment=none", "train.warmup_steps=0"]
    if cache:
        extra.append(f"train.feature_cache={tmp_path / 'cache'}")
    with pytest.raises((ImageLoadError, DataError), match=rf"{folder / 'annotations.json'}: training sample id [12]: "
                                                          r"(image file not found|refusing to decode)"):
        train(load_config(None, _train_overrides(folder, tmp_path / "run", extra)))


def test_json_lines_are_read_or_named(tmp_path):
    from sam_mllm.data.schema import DataError, read_annotations

    samples = write_dataset(tmp_path, n=3)
    lines = "".join(json.dumps(s) + "\n" for s in samples)
    (tmp_path / "annotations.json").write_text(lines)
    with pytest.raises(DataError, match=r"annotations\.json: expected a JSON list of samples; this looks like JSON Lines"):
        read_annotations(tmp_path / "annotations.json")
    (tmp_path / "annotations.jsonl").write_text(lines)
    read, _ = read_annotations(tmp_path / "annotations.jsonl")
    assert [s.id for s in read] == [0, 1, 2]

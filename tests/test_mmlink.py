"""The MmLINK synthesis pipeline: determinism, format, QC, kill-and-resume; procedural and model-backed."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam_mllm.config import ConfigError
from sam_mllm.data import synthetic
from sam_mllm.data.mmlink import MmlinkPipeline, PipelineError, build_stages, load_mmlink_config, run
from sam_mllm.data.mmlink.tiny import build_tiny_components, identity_folders
from sam_mllm.data.schema import read_annotations


def _digest(root, *folders):
    out = {}
    for folder in folders:
        for p in sorted((root / folder).rglob("*")) if (root / folder).is_dir() else []:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    for name in ("annotations.json", "rejections.json"):
        if (root / name).is_file():
            out[name] = hashlib.sha256((root / name).read_bytes()).hexdigest()
    return out


def _provenance(root):
    recs = {}
    for p in sorted((root / "provenance").glob("*.json")):
        rec = json.loads(p.read_text())
        rec.pop("seconds")  # wall-clock times are the only thing a rerun may change
        recs[p.name] = rec
    return recs


def _proc(tmp_path, name, *overrides):
    return load_mmlink_config("mmlink/procedural", [f"output_dir={tmp_path / name}", "num_samples=4",
                                                    "image_size=48", *overrides])


class _Counting:
    """Wraps a stage; records the seed of every model call and can 'kill' the run at call ``fail_at``."""

    def __init__(self, stage, method, fail_at=None):
        self.stage, self.method, self.fail_at, self.seeds = stage, method, fail_at, []
        self.model_id = stage.model_id
        setattr(self, method, self._call)

    def _call(self, *args):
        if self.fail_at is not None and len(self.seeds) == self.fail_at:
            raise KeyboardInterrupt("killed")
        self.seeds.append(args[-1])
        return getattr(self.stage, self.method)(*args)


@pytest.fixture(scope="module")
def procedural_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmlink")
    cfg = load_mmlink_config("mmlink/procedural", [f"output_dir={root / 'a'}", "num_samples=4", "image_size=48",
                                                    "seed=3", "qc.min_mask_area=0.35"])
    return cfg, run(cfg, progress=False)


def test_procedural_same_seed_same_bytes_and_qc_listed(procedural_run, tmp_path):
    cfg, summary = procedural_run
    root = Path(summary.output_dir)
    assert summary.accepted == 4 and summary.rejected >= 1, "min_mask_area=0.35 rejects the diamonds"
    rejections = json.loads((root / "rejections.json").read_text())
    assert len(rejections) == summary.rejected
    assert all(r["reasons"] and "min_mask_area" in r["reasons"][0] for r in rejections)
    samples, bad = read_annotations(root / "annotations.json", max_images=2)
    assert len(samples) == 4 and not bad
    assert not {r["id"] for r in rejections} & {s.id for s in samples}
    again = run(load_mmlink_config("mmlink/procedural", [f"output_dir={tmp_path / 'b'}", "num_samples=4",
                                                         "image_size=48", "seed=3", "qc.min_mask_area=0.35"]),
                progress=False)
    assert again.attempted == summary.attempted
    assert _digest(root, "images", "rejected") == _digest(tmp_path / "b", "images", "rejected")
    assert _provenance(root) == _provenance(tmp_path / "b")
    other = run(_proc(tmp_path, "c", "seed=4"), progress=False)
    assert _digest(root, "images") != _digest(tmp_path / "c", "images") and other.accepted == 4


def test_procedural_matches_the_synthetic_mmlink_split_format(procedural_run, tmp_path):
    cfg, summary = procedural_run
    root = Path(summary.output_dir)
    synthetic.generate(tmp_path / "world", seed=0, image_size=48, sizes={"mmlink": {"train": 3}},
                       datasets=["mmlink"], workers=1)
    world = json.loads((tmp_path / "world" / "mmlink" / "train" / "annotations.json").read_text())
    ours = json.loads((root / "annotations.json").read_text())
    vocab = set(synthetic.vocabulary())
    names = {synthetic.object_name(s, c, p) for s in synthetic.SHAPES for c in synthetic.COLOURS
             for p in synthetic.PATTERNS}
    for records, folder in ((world, tmp_path / "world" / "mmlink" / "train"), (ours, root)):
        for r in records:
            assert list(r) == ["id", "img_list", "instruction", "output"]
            assert re.fullmatch(r"mmlink-train-\d{5}", r["id"])
            assert r["img_list"] == [f"images/{r['id']}_0.png", f"images/{r['id']}_1.png"]
            assert r["instruction"] in synthetic.MMLINK_INSTRUCTIONS
            assert r["output"].startswith("a ") and r["output"][2:] in names
            assert set(synthetic.tokenize_words(r["instruction"] + " " + r["output"])) <= vocab
            for rel in r["img_list"]:
                with Image.open(folder / rel) as im:
                    assert (im.mode, im.size) == ("RGB", (48, 48))
    # the answer names the main object of the provenance, whose two poses are in the two images
    for r in ours:
        prov = json.loads((root / "provenance" / f"{r['id']}.json").read_text())
        assert r["output"] == "a " + prov["source"]["identities"]["main"].replace("_", " ")
        assert prov["verdict"] == "accepted" and len(prov["backgrounds"]) == 2
        assert prov["backgrounds"][0]["tag"] != prov["backgrounds"][1]["tag"]
        d0, d1 = prov["source"]["identities"]["distractors"]
        assert d0 and d1 and not set(d0) & set(d1), "distractors differ between the two images"


def test_kill_and_resume_no_duplicates_no_repeated_calls(tmp_path):
    cfg = _proc(tmp_path, "r", "num_samples=3")
    run(_proc(tmp_path, "ref", "num_samples=3"), progress=False)
    stages = build_stages(cfg)
    stages["inpainter"] = _Counting(stages["inpainter"], "inpaint", fail_at=3)  # dies inside sample 1
    stages["writer"] = first_writer = _Counting(stages["writer"], "write")
    with pytest.raises(KeyboardInterrupt):
        MmlinkPipeline(cfg, stages).run(progress=False)
    killed_inpaint = stages["inpainter"].seeds
    assert len(killed_inpaint) == 3 and (tmp_path / "r" / ".partial").is_dir()
    stages2 = build_stages(cfg)
    stages2["inpainter"] = _Counting(stages2["inpainter"], "inpaint")
    stages2["writer"] = _Counting(stages2["writer"], "write")
    summary = MmlinkPipeline(cfg, stages2).run(progress=False)
    assert summary.accepted == 3
    all_inpaint = killed_inpaint + stages2["inpainter"].seeds
    assert len(all_inpaint) == len(set(all_inpaint)) == 2 * summary.attempted
    all_write = first_writer.seeds + stages2["writer"].seeds
    assert len(all_write) == len(set(all_write)) == summary.attempted
    ids = [r["id"] for r in json.loads((tmp_path / "r" / "annotations.json").read_text())]
    assert len(ids) == len(set(ids)) == 3
    assert not (tmp_path / "r" / ".partial").exists()
    assert _digest(tmp_path / "r", "images") == _digest(tmp_path / "ref", "images")
    assert _provenance(tmp_path / "r") == _provenance(tmp_path / "ref")
    # a finished run resumes to a no-op; more samples continue it
    assert run(cfg, progress=False).attempted == summary.attempted
    more = run(_proc(tmp_path, "r", "num_samples=5"), progress=False)
    assert more.accepted == 5


def test_bad_config_and_run_dir_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown mmlink_segmenter 'nope'"):
        run(_proc(tmp_path, "x", "segmenter.name=nope"), progress=False)
    with pytest.raises(ConfigError, match="unknown option.*'colour'.*compositor 'paste'"):
        run(_proc(tmp_path, "x", "compositor.colour=1"), progress=False)
    with pytest.raises(PipelineError, match="image_size=50"):
        run(_proc(tmp_path, "x", "image_size=50"), progress=False)
    run(_proc(tmp_path, "y", "num_samples=1"), progress=False)
    with pytest.raises(PipelineError, match="different config"):
        run(_proc(tmp_path, "y", "num_samples=1", "seed=9"), progress=False)
    with pytest.raises(PipelineError, match="needs RGBA"):
        MmlinkPipeline(_proc(tmp_path, "z"), {**build_stages(_proc(tmp_path, "z")),
                                              "source": _RgbSource()}).run(progress=False)


class _RgbSource:
    def sample(self, rng):
        from sam_mllm.data.mmlink.stages import Item, ObjectGroup

        item = Item(Image.new("RGB", (16, 16)), "x", "x")
        return ObjectGroup((item, item), ([item], [item]))


def test_template_writer_is_seeded_and_varied():
    from sam_mllm.data.mmlink.stages import TemplateWriter

    w = TemplateWriter()
    a, b = (w.write(None, 2, np.random.default_rng(7), 0) for _ in range(2))
    assert a == b and a[0].prompt != a[1].prompt and all(x.prompt.startswith("a ") for x in a)
    assert len({w.write(None, 1, np.random.default_rng(s), 0)[0].prompt for s in range(20)}) > 10


def test_compositor_keeps_the_main_object_whole():
    from sam_mllm.data.mmlink.stages import Cutout, PasteCompositor

    rng = np.random.default_rng(0)
    main = Cutout(Image.new("RGBA", (10, 20), (200, 10, 10, 255)), "a")
    other = Cutout(Image.new("RGBA", (20, 10), (10, 200, 10, 255)), "b")
    comp = PasteCompositor(scale=(0.5, 0.6), max_overlap=1.0).compose(main, [other, other], 64, rng)
    main_px = np.asarray(comp.canvas)[comp.main_alpha == 255]
    assert len(main_px) and (main_px == (200, 10, 10)).all()
    assert (np.asarray(comp.inpaint_mask)[comp.alpha == 255] == 0).all()
    assert (np.asarray(comp.inpaint_mask)[comp.alpha == 0] == 255).all()


# ------------------------------------------------------------------ model-backed stages, tiny and random

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these models are tiny: threads only add overhead on a shared machine
    yield build_tiny_components(tmp_path_factory.mktemp("tiny_models"))
    torch.set_num_threads(threads)


def _model_cfg(tmp_path, models, name, *overrides):
    return load_mmlink_config("mmlink/characters", [
        f"output_dir={tmp_path / name}", "num_samples=2", "max_attempts=6", "image_size=64", "seed=5",
        f"source.root={tmp_path / 'identities'}",
        f"segmenter.model={models / 'sam'}",
        f"writer.model={models / 'llm'}", "writer.max_new_tokens=8", "writer.dtype=float32",
        f"refiner.model={models / 'llm'}", "refiner.max_new_tokens=8", "refiner.dtype=float32",
        f"inpainter.model={models / 'sd'}", "inpainter.steps=2",
        "describer.config=demo/sam", "describer.prompt=What is in the image?",
        # random masks are fragmented: the mask rules are loose here; the random CLIP rejects some images
        # (its scores depend on the random LLM's size, i.e. on the backbone tokenizer's vocabulary)
        "qc.min_mask_area=0.01", "qc.min_connected=0.0", f"qc.clip_model={models / 'clip'}", "qc.min_clip_score=0.3",
        *overrides])


def test_model_backed_pipeline_end_to_end(tiny_models, tmp_path):
    identity_folders(tmp_path / "identities")
    cfg = _model_cfg(tmp_path, tiny_models, "a")
    stages = build_stages(cfg)
    summary = MmlinkPipeline(cfg, stages).run(progress=False)
    root = tmp_path / "a"
    samples, bad = read_annotations(root / "annotations.json", max_images=2)
    assert summary.accepted == len(samples) == 2 and not bad
    rejections = json.loads((root / "rejections.json").read_text())
    assert rejections and all("CLIP score" in r["reasons"][0] for r in rejections)
    assert [r["id"] for r in rejections] == [p["id"] for p in _provenance(root).values() if p["verdict"] == "rejected"]
    assert not {r["id"] for r in rejections} & {s.id for s in samples}
    for s in samples:
        prov = json.loads((root / "provenance" / f"{s.id}.json").read_text())
        assert prov["models"]["inpainter"] == str(tiny_models / "sd") and prov["models"]["segmenter"] == str(
            tiny_models / "sam")
        assert s.instruction in cfg.instructions and s.output == prov["output"]
        assert all("clip_score" in m for m in prov["qc"])
        d0, d1 = prov["source"]["identities"]["distractors"]
        assert d0 != d1 and prov["source"]["identities"]["main"] not in d0 + d1, "distractors differ"
        for rel in s.img_list:
            with Image.open(root / rel) as im:
                assert (im.mode, im.size) == ("RGB", (64, 64))

    # Same seed, same stages, killed in the middle and resumed -> the same bytes, no repeated model call.
    cfg_b = _model_cfg(tmp_path, tiny_models, "b")
    counting = dict(stages, inpainter=_Counting(stages["inpainter"], "inpaint", fail_at=1),
                    refiner=_Counting(stages["refiner"], "refine"))
    with pytest.raises(KeyboardInterrupt):
        MmlinkPipeline(cfg_b, counting).run(progress=False)
    composed = []

    class Capturing:
        def compose(self, *args):
            composed.append(stages["compositor"].compose(*args))
            return composed[-1]

    resumed = dict(counting, inpainter=_Counting(stages["inpainter"], "inpaint"), compositor=Capturing())
    MmlinkPipeline(cfg_b, resumed).run(progress=False)
    inpaint_seeds = counting["inpainter"].seeds + resumed["inpainter"].seeds
    assert len(inpaint_seeds) == len(set(inpaint_seeds)) == 2 * summary.attempted - 2 * sum(
        "mask of" in r["reasons"][0] for r in rejections)
    assert len(counting["refiner"].seeds) == len(set(counting["refiner"].seeds))
    assert _digest(root, "images", "rejected") == _digest(tmp_path / "b", "images", "rejected")
    assert _provenance(root) == _provenance(tmp_path / "b")

    # The objects' pixels survive inpainting: the main object's are the cut-out's in both images, the
    # distractors are other identities' pixels; everything else was painted by the model. Sample 0 was
    # cut short by the kill, so the resumed run composed its canvases again.
    first = json.loads((root / "provenance" / "mmlink-00000.json").read_text())
    assert len(composed) >= 2 and first["img_list"]
    for k, comp in enumerate(composed[:2]):
        img, canvas = np.asarray(Image.open(root / first["img_list"][k])), np.asarray(comp.canvas)
        main = comp.main_alpha == 255
        assert main.any() and np.array_equal(img[main], canvas[main])
        others = (comp.alpha == 255) & ~main
        assert others.any() and np.array_equal(img[others], canvas[others])
        assert not np.array_equal(img[comp.alpha == 0], canvas[comp.alpha == 0])
        assert comp.boxes[-1]["identity"] == first["source"]["identities"]["main"]
    assert {b["identity"] for b in composed[0].boxes[:-1]} != {b["identity"] for b in composed[1].boxes[:-1]}


def test_missing_weights_and_missing_extra_are_clear(tmp_path, monkeypatch):
    from sam_mllm.data.mmlink import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(models.MissingWeightsError, match="segmenter: weights of 'facebook/sam-vit-huge'.*HF_HUB_OFFLINE"):
        models.SegmentAnythingSegmenter()
    with pytest.raises(models.MissingWeightsError, match="inpainter: folder .* has no model_index.json"):
        models.StableDiffusionInpainter(model=str(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)
    with pytest.raises(PipelineError, match=r"pip install -e \"\.\[mmlink\]\""):
        models.StableDiffusionInpainter(model=str(tmp_path))


def test_openai_compatible_endpoint_request():
    import httpx

    from sam_mllm.data.mmlink.models import _EndpointLLM

    seen = []

    def handler(request):
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"message": {"content": '\n "A rainy harbour at dusk." \nmore'}}]})

    llm = _EndpointLLM("some-model", "http://llm.local/v1/", "NO_SUCH_KEY_VAR", 20, 0.7, 0.9,
                       transport=httpx.MockTransport(handler))
    assert llm.complete("Write a background.", seed=2**40 + 3) == "A rainy harbour at dusk."
    assert seen[0]["model"] == "some-model" and seen[0]["seed"] == (2**40 + 3) % 2**31
    assert seen[0]["messages"] == [{"role": "user", "content": "Write a background."}]

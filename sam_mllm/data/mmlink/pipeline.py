"""The run loop: one sample at a time through the stages, committed atomically, resumable.

Output folder::

    annotations.json       accepted samples in the library's schema (sam_mllm.data.schema)
    images/{id}_{k}.png    the two images of each accepted sample
    provenance/{id}.json   one record per attempted sample: seeds, model ids, prompts, QC verdict
    rejected/{id}_{k}.png  images of samples QC rejected (for inspection), reasons in rejections.json
    run.json               the config the run was started with (a resume must use the same)
    .partial/{id}/         results of the finished steps of the sample in flight

A sample is committed when its provenance file appears (written last, by rename); a killed run
restarts at the first uncommitted sample and reuses the steps of it that had finished, so no
model is called twice for the same thing. Every random choice of sample ``i`` comes from a
generator seeded by (run seed, i, stage), so samples do not depend on each other or on where a
run was interrupted.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from sam_mllm import registry
from sam_mllm.config import ConfigError
from sam_mllm.data.mmlink.config import MmlinkConfig, to_yaml
from sam_mllm.data.mmlink.stages import (
    STAGES,
    PipelineError,
    check_size,
    cutout,
    instruction_templates,
    paste_back,
    rng_for,
    seed_for,
)
from sam_mllm.data.schema import Sample, write_annotations

PROVENANCE_VERSION = 1


def build_stage(stage: str, section: dict[str, Any]) -> Any:
    """``{name: ..., **options}`` -> the registered backend built with those options."""
    options = dict(section)
    name = options.pop("name")
    try:
        factory = registry.get(f"mmlink_{stage}", name)
    except registry.RegistryError as exc:
        raise ConfigError(f"{stage}.name: {exc}") from None
    params = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        known = [p for p in params if p != "self"]
        raise ConfigError(f"{stage}: unknown option(s) {unknown} for {stage} {name!r}; its options: "
                          f"{', '.join(known) or '(none)'}")
    return factory(**options)


def build_stages(cfg: MmlinkConfig) -> dict[str, Any]:
    return {stage: build_stage(stage, getattr(cfg, stage)) for stage in STAGES}


def fingerprint(cfg: MmlinkConfig) -> str:
    """Hash of everything that changes the samples (not the bookkeeping options)."""
    d = OmegaConf.to_container(OmegaConf.structured(cfg))
    for key in ("output_dir", "num_samples", "max_attempts", "flush_every", "resume"):
        d.pop(key)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _save_png(image: Image.Image, path: Path) -> None:
    _atomic_write(path, lambda p: image.save(p, format="PNG"))


def _save_json(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1, ensure_ascii=False), encoding="utf-8"))


class _Steps:
    """Results of one sample's finished steps, kept on disk until the sample is committed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        path = self.folder / f"{name}.pkl"
        if path.is_file():
            with path.open("rb") as f:
                return pickle.load(f)
        start = time.perf_counter()
        value = fn()
        self.seconds[name] = round(time.perf_counter() - start, 4)
        _atomic_write(path, lambda p: p.write_bytes(pickle.dumps(value, protocol=4)))
        return value


@dataclass
class RunSummary:
    output_dir: str
    accepted: int
    rejected: int
    attempted: int
    annotations: str


class MmlinkPipeline:
    """The stages of one config; ``run()`` writes (or continues) the dataset in ``cfg.output_dir``."""

    def __init__(self, cfg: MmlinkConfig, stages: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.size = check_size(int(cfg.image_size))
        self.instructions = instruction_templates(cfg.instructions)
        self.stages = stages if stages is not None else build_stages(cfg)
        missing = [s for s in STAGES if s not in self.stages]
        if missing:
            raise PipelineError(f"stages missing: {missing}")
        self.out = Path(cfg.output_dir)

    # ------------------------------------------------------------------------------------ one sample

    def sample_id(self, index: int) -> str:
        return f"{self.cfg.id_prefix}{index:05d}"

    def make_sample(self, index: int) -> dict:
        """Run every stage for sample ``index``; returns its provenance record (images attached)."""
        st, seed = self.stages, self.cfg.seed
        sid = self.sample_id(index)
        steps = _Steps(self.out / ".partial" / sid)
        group = st["source"].sample(rng_for(seed, index, "source"))
        items = [*group.main, *group.distractors[0], *group.distractors[1]]
        labels = ["main[0]", "main[1]"] + [f"distractor[0][{j}]" for j in range(len(group.distractors[0]))] + \
            [f"distractor[1][{j}]" for j in range(len(group.distractors[1]))]
        masks = steps("segment", lambda: [st["segmenter"].segment(it.image) for it in items])
        record: dict[str, Any] = {
            "id": sid, "index": index, "version": PROVENANCE_VERSION, "run_seed": seed,
            "seeds": {s: seed_for(seed, index, s) for s in STAGES},
            "models": {s: getattr(st[s], "model_id", getattr(self.cfg, s)["name"]) for s in STAGES},
            "source": {"main": [it.origin for it in group.main],
                       "distractors": [[it.origin for it in d] for d in group.distractors],
                       "identities": {"main": group.main[0].identity,
                                      "distractors": [[it.identity for it in d] for d in group.distractors]}},
        }
        reasons = [r for label, m in zip(labels, masks) for r in st["qc"].mask_reasons(label, m)]
        if reasons:  # no inpainting for a sample whose segmentation failed
            return {**record, "verdict": "rejected", "reasons": reasons, "seconds": steps.seconds, "_images": []}
        cuts = [cutout(it, m) for it, m in zip(items, masks)]
        n0 = len(group.distractors[0])
        rng = rng_for(seed, index, "compositor")
        comps = [st["compositor"].compose(cuts[0], cuts[2:2 + n0], self.size, rng),
                 st["compositor"].compose(cuts[1], cuts[2 + n0:], self.size, rng)]
        backgrounds = steps("write", lambda: st["writer"].write(group, 2, rng_for(seed, index, "writer"),
                                                                seed_for(seed, index, "writer")))
        images = []
        for k, (comp, bg) in enumerate(zip(comps, backgrounds)):
            raw = steps(f"inpaint{k}", lambda comp=comp, bg=bg, k=k: st["inpainter"].inpaint(
                comp, bg, seed_for(seed, index, "inpainter", k)))
            images.append(paste_back(raw, comp))
        description = steps("describe", lambda: st["describer"].describe(group.main[0], seed_for(seed, index,
                                                                                                 "describer")))
        answer = steps("refine", lambda: st["refiner"].refine(description, seed_for(seed, index, "refiner")))
        instruction = self.instructions[int(rng_for(seed, index, "refiner").integers(len(self.instructions)))]
        qc, metrics = st["qc"], [{}, {}]

        def check() -> tuple[list[str], list[dict]]:
            found = [r for k in range(2) for r in qc.image_reasons(k, images[k], comps[k], backgrounds[k], metrics[k])]
            return found + qc.text_reasons(answer), metrics

        reasons, metrics = steps("qc", check)
        record.update({
            "verdict": "rejected" if reasons else "accepted", "reasons": reasons,
            "backgrounds": [asdict(b) for b in backgrounds], "description": description,
            "instruction": instruction, "output": answer, "layout": [c.boxes for c in comps], "qc": metrics,
            "seconds": steps.seconds, "_images": images, "_compositions": comps,
        })
        return record

    # -------------------------------------------------------------------------------------- the run

    def _check_run_dir(self) -> None:
        run_file = self.out / "run.json"
        fp = fingerprint(self.cfg)
        if run_file.is_file():
            old = json.loads(run_file.read_text(encoding="utf-8"))
            if not self.cfg.resume:
                raise PipelineError(f"{self.out} holds a run already and resume=false: choose another output_dir")
            if old.get("fingerprint") != fp:
                raise PipelineError(f"{self.out} holds a run of a different config (fingerprint {old.get('fingerprint')}"
                                    f" != {fp}): resume it with its own config ({run_file}) or use another "
                                    "output_dir")
        elif self.out.is_dir() and any(self.out.iterdir()):
            raise PipelineError(f"{self.out} is not empty and holds no MmLINK run (no run.json)")
        else:
            _save_json({"fingerprint": fp, "config": OmegaConf.to_container(OmegaConf.structured(self.cfg))},
                       run_file)

    def _committed(self) -> dict[int, dict]:
        records = {}
        for p in sorted((self.out / "provenance").glob("*.json")):
            rec = json.loads(p.read_text(encoding="utf-8"))
            records[int(rec["index"])] = rec
        return records

    def _commit(self, record: dict) -> None:
        images = record.pop("_images")
        record.pop("_compositions", None)
        sid = record["id"]
        folder = "images" if record["verdict"] == "accepted" else "rejected"
        paths = []
        for k, im in enumerate(images):
            rel = f"{folder}/{sid}_{k}.png"
            _save_png(im, self.out / rel)
            paths.append(rel)
        record["img_list"] = paths
        _save_json(record, self.out / "provenance" / f"{sid}.json")  # the commit point
        shutil.rmtree(self.out / ".partial" / sid, ignore_errors=True)

    def _write_outputs(self, records: dict[int, dict]) -> Path:
        accepted = [records[i] for i in sorted(records) if records[i]["verdict"] == "accepted"]
        path = self.out / "annotations.json"
        if accepted:
            write_annotations([Sample(r["id"], tuple(r["img_list"]), r["instruction"], r["output"])
                               for r in accepted], path)
        rejections = [{"id": records[i]["id"], "reasons": records[i]["reasons"]}
                      for i in sorted(records) if records[i]["verdict"] == "rejected"]
        _save_json(rejections, self.out / "rejections.json")
        return path

    def run(self, progress: bool = True) -> RunSummary:
        cfg = self.cfg
        self._check_run_dir()
        records = self._committed()
        max_attempts = cfg.max_attempts if cfg.max_attempts is not None else 2 * cfg.num_samples
        accepted = sum(r["verdict"] == "accepted" for r in records.values())
        bar = tqdm(total=cfg.num_samples, initial=min(accepted, cfg.num_samples), desc="mmlink", unit="sample",
                   disable=not progress)
        index, since_flush = 0, 0
        while accepted < cfg.num_samples and index < max_attempts:
            if index not in records:
                rec = self.make_sample(index)
                self._commit(rec)
                records[index] = rec
                if rec["verdict"] == "accepted":
                    accepted += 1
                    bar.update(1)
                bar.set_postfix(rejected=len(records) - accepted)
                since_flush += 1
                if since_flush >= cfg.flush_every:
                    self._write_outputs(records)
                    since_flush = 0
            index += 1
        bar.close()
        path = self._write_outputs(records)
        shutil.rmtree(self.out / ".partial", ignore_errors=True)
        if accepted < cfg.num_samples:
            print(f"mmlink: stopped after max_attempts={max_attempts} attempts with {accepted} of "
                  f"{cfg.num_samples} samples accepted; see {self.out / 'rejections.json'}")
        return RunSummary(str(self.out), accepted, len(records) - accepted, len(records), str(path))


def run(cfg: MmlinkConfig, stages: dict[str, Any] | None = None, progress: bool = True) -> RunSummary:
    """Build the stages of ``cfg`` (unless given) and write or continue the dataset."""
    return MmlinkPipeline(cfg, stages).run(progress=progress)


__all__ = ["MmlinkPipeline", "RunSummary", "build_stage", "build_stages", "fingerprint", "run", "to_yaml"]

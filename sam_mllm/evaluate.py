"""``python -m sam_mllm.evaluate --config configs/eval/....yaml [key=value ...]``

For each dataset of ``eval.datasets``: batched generation with a progress bar, every prediction
appended to ``predictions.jsonl`` as soon as it exists (a killed run resumes where it stopped,
with no duplicates), then ``metrics.json``, ``per_sample.jsonl`` and a sortable ``report.html``.
Under ``accelerate launch`` the samples are split across processes, each evaluated exactly once;
the main process merges the predictions and scores them, so metrics equal a one-process run.
"""

from __future__ import annotations

from sam_mllm import cli

if __name__ == "__main__":  # --help and config questions answer here, before torch is imported
    cli.answer_early("sam_mllm.evaluate", __doc__)

import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from sam_mllm import registry
from sam_mllm.config import Config, ConfigError, DatasetConfig, to_yaml
from sam_mllm.data.images import survey
from sam_mllm.data.processing import Processor, load_image, to_device
from sam_mllm.data.schema import DataError, Sample, read_annotations
from sam_mllm.metrics import score
from sam_mllm.models import SAMModel, build_model
from sam_mllm.provenance import FolderLock, OutputFolderError, check_fingerprint, eval_fingerprint

PREDICTIONS = "predictions.jsonl"


@dataclass
class EvalSet:
    name: str
    task: str
    root: Path  # folder of annotations.json; image paths are relative to it
    samples: list[Sample]
    bad: list  # BadSample entries skipped under eval.skip_bad
    annotations: Path | None = None  # the annotations file (its hash is part of the predictions' fingerprint)
    image_mode: str = "released"  # data.image_mode: how model and report load the images


def dataset_root(cfg: Config, ds: DatasetConfig) -> tuple[str, str, Path]:
    """(name, task, folder) of a dataset entry; registered names fill in task and default path."""
    info = None
    if ds.name in registry.names("dataset"):
        info = registry.get("dataset", ds.name)
    elif not (ds.task and ds.path):
        raise DataError(
            f"dataset {ds.name!r} is not registered, so it needs both 'task' and 'path'; registered "
            f"datasets: {', '.join(registry.names('dataset'))}"
        )
    task = ds.task or info.task
    registry.get("task", task)  # an unknown task fails here, listing the known ones
    rel = Path(ds.path or info.path)
    root = rel if rel.is_absolute() else Path(cfg.data_root) / rel
    name = ds.name or rel.name
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        # The name is the dataset's output folder under output_dir: it must stay inside it.
        raise DataError(f"dataset name {name!r}: must be a plain folder name (no '/', '\\' or '..'); "
                        "it names the dataset's folder under output_dir")
    return name, task, root


def load_eval_set(cfg: Config, ds: DatasetConfig) -> EvalSet:
    name, task, root = dataset_root(cfg, ds)
    annotations = root / ds.annotations
    if not annotations.is_file():
        raise DataError(f"{annotations}: annotations file not found for dataset {name!r} "
                        f"(set data_root=... or the dataset's path; see `python -m sam_mllm.data.prepare --help`)")
    samples, bad = read_annotations(
        annotations, max_images=cfg.model.max_images, check_images=cfg.eval.check_images,
        skip_bad=cfg.eval.skip_bad,
    )
    limit = ds.max_samples or cfg.eval.max_samples
    if limit:
        samples = samples[:limit]
    survey(name, [root / p for s in samples for p in s.img_list], cfg.data.image_mode)
    return EvalSet(name, task, root, samples, bad, annotations, cfg.data.image_mode)


def read_jsonl(path: Path, repair: bool = False, valid: Callable[[object], bool] | None = None) -> list[dict]:
    """Records of a JSONL file; a torn last line (killed mid-write) is dropped, and cut off if ``repair``.

    With ``valid``, a record it rejects is treated like a torn line: it and everything after it.
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    records, good_end = [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            break
        if valid is not None and not valid(record):
            break
        records.append(record)
        good_end += len(line)
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


def _prediction_files(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("predictions*.jsonl"))


def _is_prediction(record: object) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("id"), (int, str))
            and not isinstance(record.get("id"), bool) and isinstance(record.get("prediction"), str))


def _claim(folder: Path, cfg: Config, model: SAMModel, eval_set: EvalSet, accelerator: Accelerator) -> None:
    """Check (main process) that the folder's predictions come from this setup; every process stops if not."""
    problem = None
    if accelerator.is_main_process:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            files = _prediction_files(folder)
            has = any(read_jsonl(p, valid=_is_prediction) for p in files)
            outputs = [folder / n for n in ("metrics.json", "per_sample.jsonl", "report.html")]
            notice = check_fingerprint(folder, eval_fingerprint(cfg, model, eval_set.annotations or Path()),
                                       has, cfg.eval.restart, files + outputs)
            if notice:
                print(notice)
        except OutputFolderError as exc:
            problem = str(exc)
    _raise_everywhere(problem, accelerator)


def _raise_everywhere(problem: str | None, accelerator: Accelerator) -> None:
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        problem = broadcast_object_list([problem])[0]
    if problem:
        raise OutputFolderError(problem)


def _batches(samples: Sequence[Sample], size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(samples), size):
        yield list(samples[start : start + size])


def _load_item(sample: Sample, root: Path, transform, mode: str = "released") -> dict:
    where = f"sample id {sample.id!r}: "
    images = [transform(load_image(root / rel, where, mode)) for rel in sample.img_list]
    return {"id": sample.id, "images": torch.stack(images), "instruction": sample.instruction, "output": sample.output}


def generate_predictions(model: SAMModel, processor: Processor, eval_set: EvalSet, out_dir: Path,
                         accelerator: Accelerator, batch_size: int, generation: dict, recall: bool = False) -> None:
    """Generate for every sample that has no prediction yet, appending to this process's file.
    ``recall``: also store each image's recalled words (nearest LLM input embeddings of its visual tokens)."""
    from sam_mllm.objectives.sea import recalled_words
    out_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        for path in _prediction_files(out_dir):
            size = path.stat().st_size
            read_jsonl(path, repair=True, valid=_is_prediction)
            if path.stat().st_size < size:
                print(f"{path}: cut off an incomplete or malformed line at the end; those samples are generated again")
    accelerator.wait_for_everyone()
    done = {json.dumps(r["id"]) for p in _prediction_files(out_dir) for r in read_jsonl(p, valid=_is_prediction)}
    todo = [s for s in eval_set.samples if json.dumps(s.id) not in done]
    mine = todo[accelerator.process_index :: accelerator.num_processes]
    own_file = out_dir / (PREDICTIONS if accelerator.is_main_process else
                          f"predictions.rank{accelerator.process_index}.jsonl")
    transform = processor.transform(train=False)
    bar = tqdm(total=len(mine), desc=f"eval {eval_set.name}", disable=not accelerator.is_local_main_process,
               unit="sample")
    model.eval()
    with open(own_file, "a", encoding="utf-8") as f:
        for chunk in _batches(mine, batch_size):
            items = [_load_item(s, eval_set.root, transform, eval_set.image_mode) for s in chunk]
            batch = to_device(processor.collate(items, with_answers=False), accelerator.device)
            texts = model.generate(batch, **generation)
            recalled = recalled_words(model, batch) if recall else [None] * len(chunk)  # SEA's Fig. 1
            for sample, text, words in zip(chunk, texts, recalled):
                record = {"id": sample.id, "prediction": text, **({"recalled_words": words} if words else {})}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()  # a kill loses at most the batch in flight
            bar.update(len(chunk))
    bar.close()
    accelerator.wait_for_everyone()


def model_label(cfg: Config) -> str:
    """Which model a config evaluates, in one line (shown in reports)."""
    m = cfg.model
    backbone = f"dims {m.dims}" if m.dims is not None else m.backbone
    return f"{m.name} on {backbone}" + (f", trained weights {m.checkpoint}" if m.checkpoint else ", nothing trained")


def score_eval_set(cfg: Config, eval_set: EvalSet, out_dir: Path,
                   report_links: Sequence[tuple[str, str]] = ()) -> dict:
    """Merge the predictions in dataset order, score them, write the outputs. Main process only."""
    by_id: dict[str, str] = {}
    recalled: dict[str, list[str]] = {}
    for path in _prediction_files(out_dir):
        for record in read_jsonl(path, valid=_is_prediction):
            by_id.setdefault(json.dumps(record["id"]), record["prediction"])
            if "recalled_words" in record:
                recalled.setdefault(json.dumps(record["id"]), record["recalled_words"])
    missing = [s.id for s in eval_set.samples if json.dumps(s.id) not in by_id]
    if missing:
        raise RuntimeError(f"{eval_set.name}: {len(missing)} samples have no prediction, e.g. {missing[:5]}")
    merged = [{"id": s.id, "prediction": by_id[json.dumps(s.id)],
               **({"recalled_words": recalled[json.dumps(s.id)]} if json.dumps(s.id) in recalled else {})}
              for s in eval_set.samples]
    _write_jsonl(out_dir / PREDICTIONS, merged)
    for path in _prediction_files(out_dir):
        if path.name != PREDICTIONS:
            path.unlink()

    task = registry.get("task", eval_set.task)
    metrics = [m for m in cfg.eval.metrics] or list(task.metrics)
    references = {json.dumps(s.id): list(s.scoring_references(cfg.eval.references)) for s in eval_set.samples}
    records = [(s.id, by_id[json.dumps(s.id)], references[json.dumps(s.id)]) for s in eval_set.samples]
    result = score(records, metrics=metrics, protocol=cfg.eval.protocol)
    summary = {**result.summary, "num_samples": len(records), "num_bad_samples": len(eval_set.bad)}
    rows = []
    for s in eval_set.samples:
        rows.append({"id": s.id, "prediction": by_id[json.dumps(s.id)], "references": references[json.dumps(s.id)],
                     "instruction": s.instruction, "images": [str(eval_set.root / p) for p in s.img_list],
                     "scores": result.per_sample[s.id], "recalled_words": recalled.get(json.dumps(s.id))})
    _write_jsonl(out_dir / "per_sample.jsonl", [{k: r[k] for k in ("id", "prediction", "references", "scores")}
                                                for r in rows])
    bad = [{"index": b.index, "id": b.id, "reason": b.reason} for b in eval_set.bad]
    _write_json(out_dir / "metrics.json", {"dataset": eval_set.name, "task": eval_set.task, **summary,
                                           "bad_samples": bad})
    if cfg.eval.html_report:
        from sam_mllm.report import write_html_report

        write_html_report(out_dir / "report.html", title=f"{eval_set.name} ({eval_set.task})", rows=rows,
                          summary=result.summary, bad_samples=bad, image_mode=eval_set.image_mode,
                          model=model_label(cfg), links=report_links)
    return summary


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def evaluate(cfg: Config, model: SAMModel | None = None, accelerator: Accelerator | None = None,
             out_dir: Path | None = None, report_links: Sequence[tuple[str, str]] = ()) -> dict[str, dict]:
    """Evaluate on every dataset of ``cfg.eval.datasets``; returns {dataset: summary} (main process).

    ``report_links``: ``(href, text)`` pairs each report.html shows under its title (hrefs relative
    to the dataset's folder ``out_dir/<dataset>/``).
    """
    if not cfg.eval.datasets:
        raise ConfigError("eval.datasets is empty: give --config (e.g. --config eval/clevr_change; see "
                          "--list-configs) or name the datasets in eval.datasets")
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = model or build_model(cfg.model).to(accelerator.device)
    processor = Processor.for_model(model, cfg.model)
    out_dir = Path(out_dir or cfg.output_dir)
    lock, problem = FolderLock(out_dir), None
    if accelerator.is_main_process:  # a second evaluation of this folder stops here, naming the first
        try:
            lock.acquire()
        except OutputFolderError as exc:
            problem = str(exc)
    _raise_everywhere(problem, accelerator)
    try:
        return _evaluate_locked(cfg, model, processor, accelerator, out_dir, report_links)
    finally:
        lock.release()


def _evaluate_locked(cfg: Config, model: SAMModel, processor: Processor, accelerator: Accelerator,
                     out_dir: Path, report_links: Sequence[tuple[str, str]] = ()) -> dict[str, dict]:
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))
    generation = dict(vars(cfg.generation))
    results: dict[str, dict] = {}
    for ds in cfg.eval.datasets:
        eval_set = load_eval_set(cfg, ds)
        if eval_set.bad and accelerator.is_main_process:
            print(f"{eval_set.name}: skipped {len(eval_set.bad)} bad samples (eval.skip_bad=true):")
            for b in eval_set.bad:
                print(f"  #{b.index} id {b.id!r}: {b.reason}")
        ds_dir = out_dir / eval_set.name
        _claim(ds_dir, cfg, model, eval_set, accelerator)
        generate_predictions(model, processor, eval_set, ds_dir, accelerator, cfg.eval.batch_size, generation,
                             recall=cfg.eval.recalled_words)
        if accelerator.is_main_process:
            results[eval_set.name] = score_eval_set(cfg, eval_set, ds_dir, report_links)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(out_dir / "metrics.json", results)
        m = cfg.model
        weights = m.checkpoint or m.lavis_checkpoint or "untrained"
        print(f"\nmodel {m.name} on {m.backbone if m.dims is None else f'dims={m.dims}'} ({weights}) -> {out_dir}")
        print(format_table(results))
    return results


def format_table(results: dict[str, dict], keys: Sequence[str] = ("ROUGE_L", "CIDEr", "BLEU_4")) -> str:
    lines = [f"{'dataset':<32}" + "".join(f"{k:>10}" for k in keys) + f"{'samples':>9}"]
    for name, summary in results.items():
        lines.append(f"{name:<32}" + "".join(f"{summary.get(k, float('nan')):>10.2f}" for k in keys)
                     + f"{summary.get('num_samples', 0):>9}")
    return "\n".join(lines)


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    evaluate(cli.parse_config(argv, "sam_mllm.evaluate", __doc__))


if __name__ == "__main__":
    main()

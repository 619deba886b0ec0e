"""``python -m sam_mllm.score PREDICTIONS... --dataset NAME|DIR`` — score any model's predictions.

Scores prediction files with the paper's protocol against a dataset in our schema, exactly as
``sam_mllm.evaluate`` scores its own predictions (the same code writes the same ``metrics.json``,
``per_sample.jsonl`` and ``report.html``), so Table 2's baselines can be entered from their outputs.
A prediction file is any of:

- the released SAM code's ``pred.json``: a JSON list of ``{"sample_id", "pred_response", "gt_response"}``;
- our ``predictions.jsonl`` / ``per_sample.jsonl`` (one ``{"id", "prediction", ...}`` per line), or a
  JSON list of such records;
- a folder holding one of those (an evaluation output folder of one dataset).

With several files, ``side_by_side.html`` puts the models next to each other (the paper's Fig. 4 as a
page): each sample's thumbnails once, a column per model with its prediction and scores, and a
"Δ metric" column per model against the first, to sort by. Without ``--dataset``, released files are
scored against their own ``gt_response`` (the released ``evaluate_score.py``'s protocol); no images.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from sam_mllm import cli
from sam_mllm.config import Config, ConfigError, DatasetConfig, load_config
from sam_mllm.data.schema import DataError, Sample
from sam_mllm.evaluate import PREDICTIONS, EvalSet, load_eval_set, read_jsonl, score_eval_set
from sam_mllm.metrics import normalize
from sam_mllm.provenance import file_sha256, write_fingerprint

ID_KEYS = ("id", "sample_id")
PREDICTION_KEYS = ("prediction", "pred_response")
SIDE_BY_SIDE = "side_by_side.html"


class PredictionFileError(DataError):
    """A predictions file that cannot be read or does not fit the dataset; names the file and the record."""


def prediction_file(path: str | Path) -> Path:
    """``path`` itself, or the predictions file inside the folder ``path``."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in (PREDICTIONS, "pred.json", "per_sample.jsonl"):
        if (path / name).is_file():
            return path / name
    raise PredictionFileError(f"{path}: no {PREDICTIONS}, pred.json or per_sample.jsonl in this folder")


def read_predictions(path: str | Path) -> list[dict]:
    """``[{"id", "prediction", "gt_response"?}]`` from any supported file (or a folder holding one)."""
    path = prediction_file(path)
    if not path.is_file():
        raise PredictionFileError(f"predictions file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = read_jsonl(path)
        if len(records) != sum(1 for line in text.splitlines() if line.strip()):
            raise PredictionFileError(f"{path}: line {len(records) + 1} is not a complete JSON object")
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PredictionFileError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: "
                                      f"{exc.msg}") from None
        if not isinstance(records, list):
            raise PredictionFileError(f"{path}: expected a JSON list of prediction records, "
                                      f"not {type(records).__name__}")
    out, seen = [], {}
    for index, rec in enumerate(records):
        where = f"{path}: record #{index}"
        if not isinstance(rec, dict):
            raise PredictionFileError(f"{where} is a {type(rec).__name__}, not an object")
        id_key = next((k for k in ID_KEYS if k in rec), None)
        pred_key = next((k for k in PREDICTION_KEYS if k in rec), None)
        if id_key is None or pred_key is None:
            raise PredictionFileError(f"{where}: needs one of {ID_KEYS} and one of {PREDICTION_KEYS}; "
                                      f"has {sorted(rec)}")
        sid, pred = rec[id_key], rec[pred_key]
        if isinstance(sid, bool) or not isinstance(sid, (int, str)):
            raise PredictionFileError(f"{where}: id {sid!r} must be an int or a string")
        if not isinstance(pred, str):
            raise PredictionFileError(f"{where} (id {sid!r}): prediction must be a string, not {type(pred).__name__}")
        key = json.dumps(sid)
        if key in seen:
            raise PredictionFileError(f"{where}: id {sid!r} already used by record #{seen[key]}")
        seen[key] = index
        item = {"id": sid, "prediction": pred}
        if isinstance(rec.get("gt_response"), str):
            item["gt_response"] = rec["gt_response"]
        out.append(item)
    if not out:
        raise PredictionFileError(f"{path}: no prediction records")
    return out


def align(records: list[dict], eval_set: EvalSet, source: str) -> list[dict]:
    """Records keyed by the dataset's own ids, in dataset order; every sample needs exactly one.

    Ids match exactly or, failing that, as strings (a released file may write ``12`` for ``"12"``).
    """
    exact = {json.dumps(s.id): s for s in eval_set.samples}
    as_str: dict[str, Sample] = {}
    for s in eval_set.samples:
        as_str.setdefault(str(s.id), s)
    by_key: dict[str, dict] = {}
    unknown = []
    for rec in records:
        sample = exact.get(json.dumps(rec["id"])) or as_str.get(str(rec["id"]))
        if sample is None:
            unknown.append(rec["id"])
            continue
        key = json.dumps(sample.id)
        if key in by_key:
            raise PredictionFileError(f"{source}: ids {by_key[key]['id']!r} and {rec['id']!r} both name "
                                      f"sample {sample.id!r} of {eval_set.name}")
        by_key[key] = {**rec, "id": sample.id}
    if unknown:
        raise PredictionFileError(f"{source}: {len(unknown)} prediction ids are not in dataset {eval_set.name!r} "
                                  f"(wrong dataset?), e.g. {unknown[:5]}")
    missing = [s.id for s in eval_set.samples if json.dumps(s.id) not in by_key]
    if missing:
        raise PredictionFileError(f"{source}: {len(missing)} of {len(eval_set.samples)} samples of "
                                  f"{eval_set.name!r} have no prediction, e.g. {missing[:5]}")
    return [by_key[json.dumps(s.id)] for s in eval_set.samples]


def _check_gt(records: list[dict], eval_set: EvalSet, source: str, protocol: str) -> None:
    """Warn when a released file's ``gt_response`` is not the dataset's reference (another version?)."""
    refs = {json.dumps(s.id): (s.output, *s.all_references) for s in eval_set.samples}
    off = [r["id"] for r in records if "gt_response" in r
           and normalize(r["gt_response"], protocol) not in {normalize(x, protocol) for x in refs[json.dumps(r["id"])]}]
    if off:
        print(f"warning: {source}: gt_response of {len(off)} samples differs from {eval_set.name}'s references "
              f"(scored against the dataset), e.g. id {off[0]!r}", file=sys.stderr)


def _self_referenced_set(records: list[dict], source: str, task: str | None) -> EvalSet:
    missing = [r["id"] for r in records if "gt_response" not in r]
    if missing:
        raise PredictionFileError(f"{source}: without --dataset every record needs a gt_response; "
                                  f"id {missing[0]!r} has none")
    samples = [Sample(r["id"], (), "", r["gt_response"]) for r in records]
    # The task only names the report here: the three tasks are scored alike.
    return EvalSet(Path(source).parent.name or "predictions", task or "group_captioning", Path("."), samples, [])


def score_file(cfg: Config, path: str | Path, eval_set: EvalSet | None, out_dir: Path,
               task: str | None = None) -> tuple[EvalSet, dict]:
    """Score one predictions file into ``out_dir`` (metrics.json, per_sample.jsonl, report.html)."""
    path = prediction_file(path)
    records = read_predictions(path)
    if eval_set is None:
        eval_set = _self_referenced_set(records, str(path), task)
    else:
        records = align(records, eval_set, str(path))
        _check_gt(records, eval_set, str(path), cfg.eval.protocol)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("predictions*.jsonl"):
        old.unlink()  # score exactly this file, never leftovers of an earlier run in the folder
    with open(out_dir / PREDICTIONS, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"id": r["id"], "prediction": r["prediction"]}, ensure_ascii=False) + "\n")
    # These predictions come from a file, not a model: an evaluation into this folder must not reuse them.
    write_fingerprint(out_dir, {"scored_file": str(path), "scored_file_sha256": file_sha256(path)})
    return eval_set, score_eval_set(cfg, eval_set, out_dir)


def default_names(paths: Sequence[Path]) -> list[str]:
    """Short distinct names: the path components that differ between the files."""
    parts = [p.resolve().parts for p in paths]
    if len(parts) == 1:
        p = Path(*parts[0])
        return [p.name if p.is_dir() else p.parent.name]
    width = max(map(len, parts))
    padded = [pp + ("",) * (width - len(pp)) for pp in parts]
    differ = [i for i in range(width) if len({pp[i] for pp in padded}) > 1]
    return ["/".join(pp[i] for i in differ if pp[i]) or str(k) for k, pp in enumerate(padded)]


def run(cfg: Config, files: Sequence[str | Path], dataset: str | None, task: str | None, out: Path,
        names: Sequence[str] | None = None, sort_metric: str = "CIDEr") -> dict[str, dict]:
    """Score every file; with several, also write the side-by-side page. Returns {model: summary}."""
    files = [Path(f) for f in files]
    names = list(names) if names else default_names(files)
    if len(names) != len(files):
        raise ConfigError(f"--names gives {len(names)} names for {len(files)} prediction files")
    if len(set(names)) != len(names):
        raise ConfigError(f"model names must differ, got {names}; pass --names")
    eval_set = None
    if dataset is not None:
        as_dir = Path(dataset)
        if as_dir.is_dir():
            if not task:
                raise ConfigError(f"--dataset {dataset} is a folder: give its --task "
                                  "(group_captioning, storytelling or change_captioning)")
            ds = DatasetConfig(name=as_dir.name, task=task, path=str(as_dir.resolve()))
        else:
            ds = DatasetConfig(name=dataset, task=task or "")
        eval_set = load_eval_set(cfg, ds)
    results, runs, last_set = {}, {}, None
    for name, path in zip(names, files):
        last_set, results[name] = score_file(cfg, path, eval_set, out / name, task)
        per = {json.dumps(r["id"]): r for r in read_jsonl(out / name / "per_sample.jsonl")}
        runs[name] = {"summary": results[name], "per_sample": per}
    if len(files) > 1:
        shown = eval_set or last_set
        samples = [{"id": s.id, "images": [str(shown.root / p) for p in s.img_list], "instruction": s.instruction,
                    "references": list(s.all_references)} for s in shown.samples]
        from sam_mllm.report import write_side_by_side_report

        write_side_by_side_report(out / SIDE_BY_SIDE, title=f"{shown.name} ({shown.task}): {', '.join(names)}",
                                  samples=samples, runs=runs, sort_metric=sort_metric)
    return results


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    p = cli.parser("sam_mllm.score", __doc__)
    p.add_argument("inputs", nargs="+", metavar="FILE_OR_KEY=VALUE",
                   help="prediction files (pred.json, predictions.jsonl) or folders holding one; and key=value "
                   "config overrides, e.g. eval.references=paper data_root=/data")
    p.add_argument("--dataset", help="registered dataset name or a folder holding annotations.json; "
                   "omitted: score released files against their own gt_response")
    p.add_argument("--task", help="the dataset's task when --dataset is a folder")
    p.add_argument("--names", help="comma-separated model names, one per file (default: from the paths)")
    p.add_argument("--out", default="runs/score", help="output folder: <out>/<model>/ per file, side_by_side.html")
    p.add_argument("--sort-metric", default="CIDEr", help="metric of the side-by-side page's difference columns")
    p.add_argument("--config", default=None, help="config for eval.* options and data_root")
    args = p.parse_intermixed_args(argv)
    files = [f for f in args.inputs if "=" not in f or Path(f).exists()]
    overrides = [f for f in args.inputs if f not in files]
    names = args.names.split(",") if args.names else None
    cfg = load_config(args.config, ["eval.check_images=false", *overrides])
    results = run(cfg, files, args.dataset, args.task, Path(args.out), names, args.sort_metric)
    from sam_mllm.evaluate import format_table

    print(format_table(results))
    if len(results) > 1:
        print(f"side by side: {Path(args.out) / SIDE_BY_SIDE}")


if __name__ == "__main__":
    main()

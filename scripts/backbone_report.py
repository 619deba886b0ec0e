"""Instruction generalisation of a frozen backbone: held-in vs held-out phrasings and tasks.

    python scripts/backbone_report.py [--backbone sam_mllm/assets/tiny_backbone] [--data runs/backbone_report/data]
        [--table docs/backbone_report.md] [--margin 5] [key=value ...]

Evaluates the backbone, nothing trained, on the ``instruct`` test split of the synthetic world
(seed 0, sam_mllm.data.instructions): each test image asked one held-in task with a training
phrasing, the same task with a held-out phrasing, and a held-out task. Scores exact-match accuracy
per task (answers such as "red." or "a blue striped star.") and ROUGE-L, the share of answers in
the task's form (``sam_mllm.data.instructions.answer_form``: instruction following apart from
perception), and the share of answers that run into a repetition loop. Greedy decoding, at most 48 new tokens (the longest answers have
about 40). Reports whether held-out phrasing accuracy is within ``--margin`` points of held-in.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from sam_mllm.config import DatasetConfig, load_config
from sam_mllm.data.instructions import HELDOUT_FILES, HELDOUT_TASKS, TASKS, well_formed
from sam_mllm.data.synthetic import DEFAULT_SIZES, generate
from sam_mllm.evaluate import evaluate

SETS = {"held_in": "annotations.json", **HELDOUT_FILES}
METRICS = ["exact_match", "rouge_l", "repetition_loop"]


def per_task(run: Path, folder: Path) -> dict[str, dict[str, dict[str, float]]]:
    """{set: {task: {"accuracy", "formed", "n"}}} from the evaluation's per-sample predictions."""
    tasks = json.loads((folder / "tasks.json").read_text())
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, file in SETS.items():
        scores: dict[str, list[tuple[float, float]]] = {}
        for line in (run / name / "per_sample.jsonl").read_text().splitlines():
            r = json.loads(line)
            task = tasks[file][r["id"]]
            scores.setdefault(task, []).append((r["scores"]["exact_match"], 100.0 * well_formed(task, r["prediction"])))
        out[name] = {t: {"accuracy": statistics.mean(a for a, _ in v), "formed": statistics.mean(f for _, f in v),
                         "n": len(v)} for t, v in scores.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="sam_mllm/assets/tiny_backbone")
    p.add_argument("--data", default="runs/backbone_report/data")
    p.add_argument("--out", default="runs/backbone_report")
    p.add_argument("--table", default=None, help="write the report (Markdown) here")
    p.add_argument("--margin", type=float, default=5.0, help="allowed held-in minus held-out gap, points")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the evaluation config")
    args = p.parse_args()
    start = time.monotonic()
    folder = Path(args.data) / "instruct" / "test"
    if not (folder / "tasks.json").is_file():  # the test split alone: splits are independent of each other
        generate(args.data, seed=0, datasets=["instruct"],
                 sizes={"instruct": {"train": 0, "val": 0, "test": DEFAULT_SIZES["instruct"]["test"]}})
    cfg = load_config("demo/zeroshot", [f"model.backbone={args.backbone}", f"data_root={args.data}",
                                        "generation.num_beams=1", "generation.repetition_penalty=1.0",
                                        "generation.max_new_tokens=48", "eval.html_report=false", *args.overrides])
    cfg.eval.metrics = METRICS
    cfg.eval.datasets = [DatasetConfig(name=name, task="group_captioning", path="instruct/test", annotations=file)
                         for name, file in SETS.items()]
    summary = evaluate(cfg, out_dir=Path(args.out))
    tasks = per_task(Path(args.out), folder)
    def formed(name: str) -> float:
        cells = tasks[name].values()
        return sum(c["formed"] * c["n"] for c in cells) / sum(c["n"] for c in cells)

    lines = ["| task | exact match, held-in phrasing | held-out phrasing | well-formed, held-in | held-out | samples |",
             "|---|---|---|---|---|---|"]
    for t in TASKS:
        a, b = tasks["held_in"].get(t.name), tasks["heldout_phrasing"].get(t.name)
        if a:
            lines.append(f"| {t.name} | {a['accuracy']:.1f} | {b['accuracy']:.1f} | {a['formed']:.1f} | "
                         f"{b['formed']:.1f} | {a['n']} |")
    lines.append(f"| **all** | **{summary['held_in']['exact_match']:.1f}** | "
                 f"**{summary['heldout_phrasing']['exact_match']:.1f}** | **{formed('held_in'):.1f}** | "
                 f"**{formed('heldout_phrasing'):.1f}** | {summary['held_in']['num_samples']} |")
    lines.append(f"| all, ROUGE-L | {summary['held_in']['ROUGE_L']:.1f} | "
                 f"{summary['heldout_phrasing']['ROUGE_L']:.1f} | | | |")
    lines.append(f"| repetition loops (% of answers) | {summary['held_in']['repetition_loop']:.1f} | "
                 f"{summary['heldout_phrasing']['repetition_loop']:.1f} | | | |")
    held = ["", "| held-out task | exact match | well-formed | samples |", "|---|---|---|---|"]
    for t in HELDOUT_TASKS:
        if t.name in tasks["heldout_task"]:
            c = tasks["heldout_task"][t.name]
            held.append(f"| {t.name} | {c['accuracy']:.1f} | {c['formed']:.1f} | {c['n']} |")
    held.append(f"| **all** (ROUGE-L {summary['heldout_task']['ROUGE_L']:.1f}) | "
                f"**{summary['heldout_task']['exact_match']:.1f}** | **{formed('heldout_task'):.1f}** | "
                f"{summary['heldout_task']['num_samples']} |")
    gap = summary["held_in"]["exact_match"] - summary["heldout_phrasing"]["exact_match"]
    verdict = (f"held-out phrasing exact-match accuracy is {gap:+.1f} points below held-in: "
               f"{'within' if gap <= args.margin else 'NOT within'} the {args.margin:g}-point margin")
    text = "\n".join(lines + held) + f"\n\n{verdict}."
    command = "python scripts/backbone_report.py " + " ".join(sys.argv[1:])
    print(text)
    print(f"\n{time.monotonic() - start:.0f} s")
    if args.table:
        Path(args.table).write_text(f"<!-- written by: {command.strip()} ({time.monotonic() - start:.0f} s) -->\n\n"
                                    f"{text}\n")


if __name__ == "__main__":
    main()

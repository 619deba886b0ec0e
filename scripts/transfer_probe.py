"""Why do guided models fail zero-shot group captioning? Separate the new instruction from the new N.

    python scripts/transfer_probe.py [--runs runs/results] [--seeds 0 1 2]

Reads the runs of ``scripts/results_table.py``. Group captioning asks MmLINK's question ("which
object do the images share?") with an unseen instruction and 2-5 images, where MmLINK training
used 2 images and four fixed instructions. For each trained row and seed this script re-scores the
existing group-captioning predictions split by image count, then evaluates the same test samples
again with a training instruction in place of the task's one. Prints mean ROUGE-L and CIDEr over
the seeds for each (instruction, N) cell.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from sam_mllm.config import DatasetConfig, load_config
from sam_mllm.evaluate import evaluate
from sam_mllm.metrics import score

ROWS = {"+DATA": "data", "+BSG": "bsg", "+LIN": "lin", "SAM": "sam"}
TRAIN_INSTRUCTION = "Name the thing that is in every image."
GROUP = "synthetic/group_captioning/test"
PROBE_FILE = "annotations_train_instruction.json"


def split_scores(per_sample: Path, n_images: dict[str, int]) -> dict[str, dict[str, float]]:
    rows = [json.loads(line) for line in per_sample.read_text().splitlines() if line.strip()]
    out = {}
    for label, keep in (("N=2", lambda n: n == 2), ("N=3-5", lambda n: n > 2)):
        part = [(r["id"], r["prediction"], r["references"]) for r in rows if keep(n_images[r["id"]])]
        out[label] = score(part, ("rouge_l", "cider")).summary
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/results")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    cells: dict[tuple[str, str, str, str], list[float]] = {}
    for seed in args.seeds:
        base = Path(args.runs) / f"seed{seed}"
        folder = base / "data" / GROUP
        samples = json.loads((folder / "annotations.json").read_text())
        n_images = {str(s["id"]): len(s["img_list"]) for s in samples}
        (folder / PROBE_FILE).write_text(json.dumps([s | {"instruction": TRAIN_INSTRUCTION} for s in samples]))
        for row, slug in ROWS.items():
            run = base / slug
            probe_out = run / "probe"
            if not (probe_out / "probe" / "per_sample.jsonl").is_file():
                cfg = load_config(f"demo/{slug}", [f"data_root={base / 'data'}", f"seed={seed}",
                                                   f"model.checkpoint={run / 'final'}", "eval.html_report=false"])
                cfg.eval.datasets = [DatasetConfig(name="probe", task="group_captioning", path=GROUP,
                                                   annotations=PROBE_FILE)]
                evaluate(cfg, out_dir=probe_out)
            for instr, per_sample in (("task", run / "eval" / "synthetic_group_captioning" / "per_sample.jsonl"),
                                      ("training", probe_out / "probe" / "per_sample.jsonl")):
                for label, summary in split_scores(per_sample, n_images).items():
                    for metric, value in summary.items():
                        cells.setdefault((row, instr, label, metric), []).append(value)
    header = "| model | instruction | N=2 ROUGE_L | N=2 CIDEr | N=3-5 ROUGE_L | N=3-5 CIDEr |"
    lines = [header, "|---|---|---|---|---|---|"]
    for row in ROWS:
        for instr in ("task", "training"):
            vals = [statistics.mean(cells[(row, instr, n, m)]) for n in ("N=2", "N=3-5") for m in ("ROUGE_L", "CIDEr")]
            lines.append(f"| {row} | {instr} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    print("\n".join(lines))
    counts = {k: sum(1 for v in n_images.values() if (v == 2) == (k == "N=2")) for k in ("N=2", "N=3-5")}
    print(f"\nlast seed's test set: {counts}; mean over seeds {args.seeds}")


if __name__ == "__main__":
    main()

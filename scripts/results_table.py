"""The synthetic-world version of the paper's Table 3, over several seeds -> docs/RESULTS.md.

    python scripts/results_table.py [--seeds 0 1 2] [--out runs/results] [--mmlink-instructions diverse] [--rows ROW ...]
        [key=value ...]

For each seed: a fresh synthetic world (generator seed = run seed), then zero-shot InstructBLIP,
+DATA, +BSG, +LIN and SAM (configs/demo/*.yaml) trained on its MmLINK split and evaluated on the
three synthetic tasks (+VPG-C, +MMICL, MMFS and SAM+MMFS too; ``--rows`` picks rows). Prints the mean and standard deviation per task and metric as a Markdown
table and writes it, with the command and raw numbers, to --table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from sam_mllm.data.synthetic import MMLINK_INSTRUCTION_SETS
from sam_mllm.demo import METRICS, ensure_data, repetition_rates, run_variant

ROWS = {"InstructBLIP (zero-shot)": "demo/zeroshot", "+DATA": "demo/data", "+BSG": "demo/bsg",
        "+LIN": "demo/lin", "+VPG-C": "demo/vpgc", "+MMICL": "demo/mmicl", "SAM": "demo/sam",
        "MMFS": "demo/mmfs", "SAM+MMFS": "demo/sam_mmfs"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/results")
    p.add_argument("--table", default="docs/results_table.md")
    p.add_argument("--mmlink-instructions", default="fixed", choices=list(MMLINK_INSTRUCTION_SETS),
                   help="phrasings of the MmLINK training question (sam_mllm.data.synthetic)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to run (default: all)")
    p.add_argument("--collect", action="store_true",
                   help="only read the finished runs' metrics under --out (e.g. after one process per seed)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    rows = {row: ROWS[row] for row in ROWS if row in args.rows}
    start = time.monotonic()
    raw: dict[str, dict[int, dict]] = {row: {} for row in rows}
    for seed in args.seeds:
        base = Path(args.out) / f"seed{seed}"
        if not args.collect:
            ensure_data(base / "data", seed, args.mmlink_instructions)
        for row, config in rows.items():
            slug = config.split("/")[1]
            if args.collect:
                raw[row][seed] = json.loads((base / slug / "eval" / "metrics.json").read_text())
                continue
            _, raw[row][seed] = run_variant(config, base / slug, seed, args.overrides)
    datasets = list(next(iter(next(iter(raw.values())).values())))
    header = "| model | " + " | ".join(f"{d.replace('synthetic_', '')} {m}" for d in datasets for m in METRICS) + " |"
    lines = [header, "|" + "---|" * (1 + len(datasets) * len(METRICS))]
    for row in rows:
        cells = []
        for d in datasets:
            for m in METRICS:
                vals = [raw[row][s][d][m] for s in args.seeds]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.2f} ± {sd:.2f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    # How often each row's answers loop ("the the the ..."), mean over seeds.
    loops = {row: {} for row in rows}
    for seed in args.seeds:
        for row, config in rows.items():
            per = repetition_rates(Path(args.out) / f"seed{seed}", {config.split("/")[1]: raw[row][seed]})
            for d, rate in next(iter(per.values())).items():
                loops[row].setdefault(d, []).append(rate)
    lines += ["", "Repetition loops (% of answers, mean over seeds):", "",
              "| model | " + " | ".join(d.replace("synthetic_", "") for d in datasets) + " |",
              "|" + "---|" * (1 + len(datasets))]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(f"{statistics.mean(loops[row][d]):.1f}" for d in datasets) + " |")
    text = "\n".join(lines)
    command = "python scripts/results_table.py " + " ".join(sys.argv[1:])
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text(
        f"<!-- written by: {command.strip()} ({time.monotonic() - start:.0f} s) -->\n\n{text}\n\n"
        f"Raw numbers per seed:\n\n```json\n{json.dumps(raw, indent=1)}\n```\n")
    print(text)
    print(f"\n{time.monotonic() - start:.0f} s; written to {args.table}")


if __name__ == "__main__":
    main()

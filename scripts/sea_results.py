"""SEA on the synthetic world -> docs/sea_results_table.md: SEA alone, SAM + SEA, a λ sweep and
SEA's exact setting (MLP projector), with the recalled-word accuracy of SEA's Fig. 1.

    python scripts/sea_results.py [--seeds 0 1 2] [--rows ...] [--out runs/sea_results] [key=value ...]

Per seed: a fresh synthetic world (generator seed = run seed), oracle patch labels (one row: the
tiny CLIP's, sam_mllm/assets/tiny_clip), then each row
trained on its MmLINK split (configs/demo/sea*.yaml; the λ = 0 rows train with SEA computed and
logged but weighted 0, which is bit-identical to training without it) and evaluated on the
held-out MmLINK pairs and group captioning. Recalled-word accuracy: on the held-out MmLINK images,
the share of visual tokens whose nearest label-word embedding (Eq. 8, cosine) is the token's most
likely oracle label (sam_mllm.objectives.sea.recalled_word_accuracy); chance is 1/27.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sam_mllm.demo import ensure_data, run_variant

ROWS = {
    "+DATA (λ=0)": ("demo/sea", ["sea.weight=0"]),
    "SEA λ=0.5": ("demo/sea", ["sea.weight=0.5"]),
    "SEA λ=1": ("demo/sea", ["sea.weight=1"]),
    "SEA λ=2": ("demo/sea", ["sea.weight=2"]),
    "SEA λ=1, tiny-CLIP labels": ("demo/sea_clip", ["sea.weight=1"]),
    "SAM (λ=0)": ("demo/sam_sea", ["sea.weight=0"]),
    "SAM+SEA λ=1": ("demo/sam_sea", ["sea.weight=1"]),
    "MLP (λ=0)": ("demo/sea_mlp", ["sea.weight=0"]),
    "MLP+SEA λ=1": ("demo/sea_mlp", ["sea.weight=1"]),
}
EVAL = ["eval.datasets=[{name: synthetic_mmlink_test}, {name: synthetic_group_captioning}]"]
METRICS = ("CIDEr", "ROUGE_L")


def recall_accuracy(cfg, max_samples: int) -> float:
    """Recalled-word accuracy of a trained run on the held-out MmLINK images."""
    from sam_mllm.data.processing import Processor
    from sam_mllm.data.schema import read_annotations
    from sam_mllm.evaluate import _load_item
    from sam_mllm.models import build_model
    from sam_mllm.objectives.labellers import OracleLabeller, patch_grid
    from sam_mllm.objectives.sea import SEAObjective, collate_patch_labels, recalled_word_accuracy

    model = build_model(cfg.model).eval()
    processor = Processor.for_model(model, cfg.model)
    labeller = OracleLabeller(patch_grid(model), cfg.sea.top_n)
    objective = SEAObjective(labeller.words, model.llm_tokenizer, attribution=cfg.sea.attribution)
    root = Path(cfg.data_root) / "synthetic" / "mmlink" / "test"
    samples, _ = read_annotations(root / "annotations.json")
    transform = processor.transform(train=False)
    hits = total = 0
    for start in range(0, min(max_samples, len(samples)), 16):
        chunk = samples[start : min(start + 16, max_samples)]
        items = [dict(_load_item(s, root, transform), patch_labels=labeller([root / p for p in s.img_list]))
                 for s in chunk]
        batch = processor.collate(items, with_answers=False)
        batch["patch_labels"] = collate_patch_labels(items)
        batch.pop("ids")
        with torch.no_grad():
            h, t = recalled_word_accuracy(model, batch, objective)
        hits, total = hits + h, total + t
    return 100.0 * hits / max(total, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", default=list(ROWS), help=f"from: {', '.join(ROWS)}")
    p.add_argument("--out", default="runs/sea_results")
    p.add_argument("--table", default="docs/sea_results_table.md")
    p.add_argument("--recall-samples", type=int, default=50)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    start = time.monotonic()
    raw: dict[str, dict[int, dict]] = {row: {} for row in args.rows}
    for seed in args.seeds:
        base = Path(args.out) / f"seed{seed}"
        ensure_data(base / "data", seed)
        for row in args.rows:
            config, extra = ROWS[row]
            slug = (row.lower().replace(" ", "_").replace("(", "").replace(")", "").replace("=", "").replace("+", "p")
                    .replace(",", ""))
            over = [f"sea.label_cache={base / 'label_cache'}", *EVAL, *extra, *args.overrides]
            cfg, metrics = run_variant(config, base / slug, seed, over)
            cached = base / slug / "recall.json"
            if not cached.is_file():
                cached.write_text(json.dumps({"recalled_word_accuracy": recall_accuracy(cfg, args.recall_samples)}))
            raw[row][seed] = {**metrics, **json.loads(cached.read_text())}
            print(row, seed, json.dumps(raw[row][seed]), flush=True)
    cols = [("recalled-word acc. (%)", lambda r: r["recalled_word_accuracy"])]
    for ds in ("synthetic_mmlink_test", "synthetic_group_captioning"):
        for m in METRICS:
            cols.append((f"{ds.replace('synthetic_', '')} {m}", lambda r, ds=ds, m=m: r[ds][m]))
    lines = ["| model | " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * (1 + len(cols))]
    for row in args.rows:
        cells = []
        for _, get in cols:
            vals = [get(raw[row][s]) for s in args.seeds]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.2f} ± {sd:.2f}" if len(vals) > 1 else f"{vals[0]:.2f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    command = "python scripts/sea_results.py " + " ".join(sys.argv[1:])
    text = "\n".join(lines)
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text(
        f"<!-- written by: {command.strip()} ({time.monotonic() - start:.0f} s) -->\n\n{text}\n\n"
        f"Raw numbers per seed:\n\n```json\n{json.dumps(raw, indent=1, ensure_ascii=False)}\n```\n")
    print(text)


if __name__ == "__main__":
    main()

"""Sweep SAM's interaction layers (l, k) over the paper's 10 configurations and draw Figure 5.

The Q-Former's 12 layers are grouped in steps of 3 (1-based l, k in {3, 6, 9, 12}, k >= l): 10
configurations. Each one is a training run followed by an evaluation, both plain CLI calls:

    python scripts/sweep_layers.py --train-config configs/train/sam_mmlink.yaml \
        --eval-config configs/eval/paper_all.yaml --out runs/sweep [key=value ...]

With --layers 4 (e.g. the tiny model) the grid is {1, 2, 3, 4}. The plot shows the mean of the
three metrics over all evaluated datasets per (l, k), as the paper's Figure 5 does (a heat map of
the measured points rather than an interpolated surface).

With --seeds, every point is run once per seed (``seed=N`` and ``{seed}`` in the overrides replaced,
e.g. ``data_root=runs/results/seed{seed}/data``), each seed in OUT/seedN; the plot shows the mean
over seeds and sweep.json also holds each seed's score and the standard deviation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def grid(num_layers: int, step: int) -> list[tuple[int, int]]:
    points = list(range(step, num_layers + 1, step))
    return [(l, k) for l in points for k in points if k >= l]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-config", required=True)
    p.add_argument("--eval-config", required=True)
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--layers", type=int, default=12, help="Q-Former layers")
    p.add_argument("--step", type=int, default=3, help="layers per step of the grid")
    p.add_argument("overrides", nargs="*", help="key=value overrides for both training and evaluation")
    p.add_argument("--seeds", type=int, nargs="+", help="run every point once per seed (OUT/seedN)")
    args = p.parse_args()
    out = Path(args.out)
    if not args.seeds:
        results = sweep(args, out, args.overrides)
        (out / "sweep.json").write_text(json.dumps(results, indent=1))
        plot(results, args.layers, args.step, out / "figure5.png")
        return
    per_seed = {}
    for seed in args.seeds:
        overrides = [o.replace("{seed}", str(seed)) for o in args.overrides] + [f"seed={seed}"]
        per_seed[seed] = sweep(args, out / f"seed{seed}", overrides)
    mean = {key: statistics.mean(r[key] for r in per_seed.values()) for key in per_seed[args.seeds[0]]}
    std = {key: statistics.stdev(r[key] for r in per_seed.values()) if len(per_seed) > 1 else 0.0 for key in mean}
    for key in mean:
        print(f"l,k={key}: mean score {mean[key]:.2f} ± {std[key]:.2f} over seeds {args.seeds}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"mean": mean, "std": std, "per_seed": per_seed}, indent=1))
    plot(mean, args.layers, args.step, out / "figure5.png")


def sweep(args: argparse.Namespace, out: Path, overrides: list[str]) -> dict[str, float]:
    """Train and evaluate every (l, k) of the grid under ``out`` (finished points are reused)."""
    results = {}
    for l, k in grid(args.layers, args.step):
        run = out / f"l{l}_k{k}"
        layer_args = [f"model.guide_in_layer={l - 1}", f"model.guide_out_layer={k - 1}"]
        if not (run / "train" / "final" / "adapter.safetensors").is_file():
            subprocess.run([sys.executable, "-m", "sam_mllm.train", "--config", args.train_config, *overrides,
                            *layer_args, f"output_dir={run / 'train'}", "train.resume=latest"], check=True)
        metrics_file = run / "eval" / "metrics.json"
        if not metrics_file.is_file():
            subprocess.run([sys.executable, "-m", "sam_mllm.evaluate", "--config", args.eval_config, *overrides,
                            *layer_args, f"model.checkpoint={run / 'train' / 'final'}",
                            f"output_dir={run / 'eval'}"], check=True)
        metrics = json.loads(metrics_file.read_text())
        values = [v for m in metrics.values() for key, v in m.items() if key in ("ROUGE_L", "CIDEr", "BLEU_4")]
        results[f"{l},{k}"] = sum(values) / len(values)
        print(f"l={l} k={k}: mean score {results[f'{l},{k}']:.2f}")
    return results


def plot(results: dict[str, float], num_layers: int, step: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    points = list(range(step, num_layers + 1, step))
    grid_values = np.full((len(points), len(points)), np.nan)
    for key, value in results.items():
        l, k = map(int, key.split(","))
        grid_values[points.index(k), points.index(l)] = value
    fig, ax = plt.subplots(figsize=(5, 4))
    im = ax.imshow(grid_values, origin="lower", cmap="viridis")
    ax.set_xticks(range(len(points)), points)
    ax.set_yticks(range(len(points)), points)
    ax.set_xlabel("l (layer conveying the initial visual tokens)")
    ax.set_ylabel("k (layer conveying contextual semantics)")
    for (i, j), v in np.ndenumerate(grid_values):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, label="mean score")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

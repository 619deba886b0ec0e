"""What a 69K-sample MmLINK run costs: measured on tiny random components, scaled by FLOPs -> docs/MMLINK.md.

    python scripts/mmlink_cost.py [--samples 6] [--out runs/mmlink_cost.json]

1. Runs the model-backed pipeline (configs/mmlink/characters.yaml) on tiny random components
   (sam_mllm.data.mmlink.tiny) at 64x64 and measures, per sample, each stage's wall time and its FLOPs
   (torch's FlopCounterMode around every model call).
2. Counts the FLOPs of the real components on the meta device (no weights): Segment Anything ViT-H
   at 1024x1024, SD-1.5 inpainting at 512x512 with 50 steps and classifier-free guidance, a 7.6B
   instruction LLM, InstructBLIP-Vicuna-7B (ViT-g + Vicuna-7B, 5 beams), CLIP ViT-L/14.
3. Estimates: (a) the tiny stage time x the FLOP ratio (CPU at the tiny models' throughput); (b) GPU
   time = FLOPs / (utilisation x dense bf16 peak) + the weight reads of every decoded token / memory
   bandwidth, for an H100 SXM (989 TFLOP/s, 3.35 TB/s) at 40% and 10% utilisation. Estimates, not
   measurements of the real models.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from sam_mllm.data.mmlink import MmlinkPipeline, build_stages, load_mmlink_config
from sam_mllm.data.mmlink.tiny import build_tiny_components, identity_folders

PEAK_FLOPS, BANDWIDTH = 989e12, 3.35e12  # H100 SXM: dense bf16, HBM3 (vendor datasheet)
STEPS = {"segment": ("segmenter", "segment"), "write": ("writer", "write"), "inpaint": ("inpainter", "inpaint"),
         "describe": ("describer", "describe"), "refine": ("refiner", "refine"), "qc": ("qc", "image_reasons")}
# Real-run shapes (configs/mmlink/characters.yaml): 4 objects segmented, 2 backgrounds, 2 inpaintings.
SEG_PER_SAMPLE, WRITER_PROMPT, WRITER_NEW, REFINER_PROMPT, REFINER_NEW = 4, 90, 60, 110, 80
SD_STEPS, DESCRIBE_PROMPT, DESCRIBE_NEW, BEAMS = 50, 32 + 12, 60, 5
LLM_PARAMS, VICUNA_PARAMS = 7.6e9, 6.7e9  # Qwen2.5-7B-Instruct, Vicuna-7B (InstructBLIP's LLM)


class _TotalOnly:
    """Stands in for FlopCounterMode's module tracker: only totals are needed, and the tracker's
    backward hooks fail on models run under no_grad that return parameters (transformers' SamModel)."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def flop_counter() -> FlopCounterMode:
    fc = FlopCounterMode(display=False)
    fc.mod_tracker = _TotalOnly()
    return fc


class _Metered:
    """A stage whose method calls are timed or FLOP-counted."""

    def __init__(self, stage, method, count_flops):
        self.stage, self.method, self.count, self.flops = stage, method, count_flops, []
        if hasattr(stage, "model_id"):
            self.model_id = stage.model_id
        for name in ("mask_reasons", "text_reasons"):
            if hasattr(stage, name):
                setattr(self, name, getattr(stage, name))
        setattr(self, method, self._call)

    def _call(self, *args):
        if not self.count:
            return getattr(self.stage, self.method)(*args)
        with flop_counter() as fc:
            out = getattr(self.stage, self.method)(*args)
        self.flops.append(fc.get_total_flops())
        return out


def tiny_measurements(samples: int, work: Path) -> dict:
    models = build_tiny_components(work / "models")
    identity_folders(work / "identities")

    def cfg(name, n):
        return load_mmlink_config("mmlink/characters", [
            f"output_dir={work / name}", f"num_samples={n}", f"max_attempts={3 * n}", "image_size=64",
            f"source.root={work / 'identities'}", f"segmenter.model={models / 'sam'}",
            f"writer.model={models / 'llm'}", "writer.max_new_tokens=8", "writer.dtype=float32",
            f"refiner.model={models / 'llm'}", "refiner.max_new_tokens=8", "refiner.dtype=float32",
            f"inpainter.model={models / 'sd'}", "inpainter.steps=2", "describer.config=demo/sam",
            "qc.min_mask_area=0.01", "qc.min_connected=0.0", f"qc.clip_model={models / 'clip'}",
            "qc.min_clip_score=-1"])

    stages = build_stages(cfg("timed", samples))
    MmlinkPipeline(cfg("warmup", 1), stages).run(progress=False)  # first calls pay one-off costs
    start = time.perf_counter()
    summary = MmlinkPipeline(cfg("timed", samples), stages).run(progress=False)
    wall = (time.perf_counter() - start) / summary.attempted
    seconds: dict[str, list[float]] = {k: [] for k in STEPS}
    for p in sorted((work / "timed" / "provenance").glob("*.json")):
        rec = json.loads(p.read_text())["seconds"]
        for step in STEPS:
            seconds[step].append(sum(v for k, v in rec.items() if k.startswith(step)))
    metered = {step: _Metered(stages[stage], method, True) for step, (stage, method) in STEPS.items()}
    counted = dict(stages, **{STEPS[step][0]: m for step, m in metered.items()})
    one = MmlinkPipeline(cfg("flops", 1), counted).run(progress=False)
    assert one.accepted == 1
    per_call = {step: statistics.median(m.flops) if m.flops else 0 for step, m in metered.items()}
    calls = {step: len(m.flops) for step, m in metered.items()}
    return {"seconds_per_sample": {k: statistics.median(v) for k, v in seconds.items()},
            "flops_per_sample": {k: per_call[k] * calls[k] for k in STEPS}, "wall_per_sample": wall,
            "samples": summary.attempted}


def real_flops() -> dict:
    """FLOPs per sample of the real components (meta tensors: shapes only, no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import SamConfig, SamModel, SamVisionConfig

    def count(fn) -> float:
        with flop_counter() as fc:
            fn()
        return float(fc.get_total_flops())

    meta = torch.device("meta")
    with meta:
        sam = SamModel(SamConfig(vision_config=SamVisionConfig(hidden_size=1280, num_hidden_layers=32,
                                                               num_attention_heads=16, mlp_dim=5120,
                                                               global_attn_indexes=[7, 15, 23, 31])))
        unet = UNet2DConditionModel(in_channels=9, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64)
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2)
    empty = lambda *s: torch.empty(*s, device=meta)  # noqa: E731
    sam_image = count(lambda: sam(pixel_values=empty(1, 3, 1024, 1024), input_boxes=empty(1, 1, 4),
                                  multimask_output=True))
    unet_step = count(lambda: unet(empty(2, 9, 64, 64), torch.tensor(10, device=meta), empty(2, 77, 768)))
    vae_io = count(lambda: vae.encode(empty(1, 3, 512, 512))) + count(lambda: vae.decode(empty(1, 4, 64, 64)))
    clip_text = 2 * 123e6 * 77 * 2  # CLIP ViT-L/14 text tower, prompt and negative prompt
    vit_g, clip_l = 2 * 985e6 * 257, 2 * 304e6 * 257 + 2 * 123e6 * 77  # matmul FLOPs, 2 per MAC
    return {
        "segment": SEG_PER_SAMPLE * sam_image,
        "write": 2 * 2 * LLM_PARAMS * (WRITER_PROMPT + WRITER_NEW),
        "inpaint": 2 * (SD_STEPS * unet_step + vae_io + clip_text),
        "describe": vit_g + 2 * VICUNA_PARAMS * BEAMS * (DESCRIBE_PROMPT + DESCRIBE_NEW),
        "refine": 2 * LLM_PARAMS * (REFINER_PROMPT + REFINER_NEW),
        "qc": 2 * clip_l,
        "_per_call": {"sam_vit_h_image": sam_image, "sd_unet_cfg_step": unet_step, "sd_vae_encode_decode": vae_io},
    }


def weight_read_seconds() -> dict:
    """Decoding is bound by reading the weights once per generated token (bf16)."""
    return {"write": 2 * WRITER_NEW * LLM_PARAMS * 2 / BANDWIDTH, "refine": REFINER_NEW * LLM_PARAMS * 2 / BANDWIDTH,
            "describe": DESCRIBE_NEW * VICUNA_PARAMS * 2 / BANDWIDTH}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=6)
    p.add_argument("--total", type=int, default=69_000)
    p.add_argument("--out", default="runs/mmlink_cost.json")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: the tiny models gain nothing from more on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_measurements(args.samples, Path(tmp))
    real = real_flops()
    memory = weight_read_seconds()
    rows = []
    for step in STEPS:
        t, f_tiny, f_real = tiny["seconds_per_sample"][step], tiny["flops_per_sample"][step], real[step]
        gpu = {u: f_real / (u * PEAK_FLOPS) + memory.get(step, 0.0) for u in (0.4, 0.1)}
        rows.append({"stage": step, "tiny_s": t, "tiny_gflop": f_tiny / 1e9, "real_tflop": f_real / 1e12,
                     "cpu_scaled_s": t * f_real / f_tiny if f_tiny else None,
                     "gpu_s_u40": gpu[0.4], "gpu_s_u10": gpu[0.1]})
    total = {k: sum(r[k] for r in rows) for k in ("gpu_s_u40", "gpu_s_u10", "real_tflop")}
    result = {"command": f"python scripts/mmlink_cost.py --samples {args.samples} --threads {args.threads}",
              "tiny": tiny, "real": real,
              "rows": rows, "per_sample": total,
              "gpu_hours": {k: total[k] * args.total / 3600 for k in ("gpu_s_u40", "gpu_s_u10")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("| stage | tiny: s/sample (CPU) | tiny: GFLOP/sample | real: TFLOP/sample | tiny s x FLOP ratio (CPU) "
          "| H100 s/sample at 40% | at 10% |\n|---|---|---|---|---|---|---|")
    for r in rows:
        cpu = f"{r['cpu_scaled_s'] / 3600:.3g} h" if r["cpu_scaled_s"] else "-"
        print(f"| {r['stage']} | {r['tiny_s']:.3f} | {r['tiny_gflop']:.3g} | {r['real_tflop']:.3g} | {cpu} | "
              f"{r['gpu_s_u40']:.2f} | {r['gpu_s_u10']:.2f} |")
    print(f"| total | {sum(r['tiny_s'] for r in rows):.3f} (wall {tiny['wall_per_sample']:.3f}) | "
          f"{sum(r['tiny_gflop'] for r in rows):.3g} | {total['real_tflop']:.3g} | | {total['gpu_s_u40']:.2f} | "
          f"{total['gpu_s_u10']:.2f} |")
    print(f"{args.total} samples: {result['gpu_hours']['gpu_s_u40']:.0f} H100-hours at 40% utilisation, "
          f"{result['gpu_hours']['gpu_s_u10']:.0f} at 10% (estimate; rejected attempts come on top)")


if __name__ == "__main__":
    main()

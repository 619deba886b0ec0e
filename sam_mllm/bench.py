"""``python -m sam_mllm.bench --preset tiny|base|7b`` — what SAM costs, as ratios measured in one run.

1. SAM vs InstructBLIP: training step (forward + backward) and ``generate`` on the same batch.
2. Our batched perception vs the released code's order of work (vision encoder per image, a full
   W-stream per image, a Python loop over images), re-implemented below as ``released_order``.
3. ``context: others`` from N = 2 to 16.
4. Training step from cached vision features vs from pixels.
5. Peak memory; on a GPU also samples/s, LLM tokens/s and MFU.
Every number is a median over repeats after a warm-up; ratios compare runs of the same process.
"""

from __future__ import annotations

import argparse

from sam_mllm import cli


def build_parser() -> argparse.ArgumentParser:
    """Torch-free, so that ``--help`` answers before torch is imported."""
    p = cli.parser("sam_mllm.bench", __doc__)
    p.add_argument("--preset", default="tiny", choices=["tiny", "base", "7b"])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--images", default="1,2,3,5,8", help="comma-separated N values")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sections", default="step,generate,perception,others,cache")
    p.add_argument("--model", default="sam", help="variant compared with instructblip in the step/generate section")
    p.add_argument("--gen-tokens", type=int, default=8)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None, help="write the report as JSON (and .md beside it)")
    p.add_argument("--flops-only", action="store_true",
                   help="print the FLOP ceilings of the perception and cache ratios, timing nothing")
    return p


if __name__ == "__main__":
    cli.answer_early("sam_mllm.bench", build_parser=build_parser)

import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sam_mllm.config import ModelConfig
from sam_mllm.models import SAMModel, build_model
from sam_mllm.models.backbone import resolve_dims

# Dense bf16 peak of common accelerators, TFLOP/s (vendor datasheets, without sparsity).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_model(name: str, preset: str, device: torch.device, **options) -> SAMModel:
    dims = resolve_dims(preset)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    cfg = ModelConfig(name=name, dims=preset, dtype=dtype, **options)
    if preset == "tiny":
        return build_model(cfg).to(device)
    # Large presets: build without memory, then materialise random weights on the target device.
    model = build_model(cfg, device="meta")
    model.to_empty(device=device)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or n.startswith(("w_in", "w_out")):
                p.zero_()  # SAM's zero initialisation; biases too (timing does not depend on values)
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
        for n, b in model.named_buffers():
            if n.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1], device=device).expand_as(b))
            elif "inv_freq" in n:
                head = dims.llm_hidden // dims.llm_heads
                b.copy_(1.0 / (10000 ** (torch.arange(0, head, 2, device=device).float() / head)))
    from sam_mllm.models.tokenizers import build_word_tokenizers, default_words

    model.llm_tokenizer, model.qformer_tokenizer = build_word_tokenizers(default_words())
    return model


def make_batch(model: SAMModel, batch_size: int, num_images: int, device: torch.device,
               prompt_len: int = 32, answer_len: int = 16, seed: int = 0) -> dict:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision_config.image_size
    vocab = min(cfg.text_config.vocab_size, 100)
    input_ids = torch.randint(4, vocab, (batch_size, prompt_len + answer_len), generator=g)
    labels = input_ids.clone()
    labels[:, :prompt_len] = -100
    dtype = model.vision_model.dtype
    return {
        "pixel_values": torch.randn(batch_size, num_images, 3, s, s, generator=g).to(device, dtype),
        "image_mask": torch.ones(batch_size, num_images, dtype=torch.bool, device=device),
        "qformer_input_ids": torch.randint(5, min(cfg.qformer_config.vocab_size, 100), (batch_size, 24),
                                           generator=g).to(device),
        "qformer_attention_mask": torch.ones(batch_size, 24, dtype=torch.long, device=device),
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": labels.to(device),
    }


def train_step(model: SAMModel, batch: dict) -> Callable[[], None]:
    def run() -> None:
        model.zero_grad(set_to_none=True)
        model(batch).loss.backward()
    return run


@torch.no_grad()
def released_order(model: SAMModel, batch: dict) -> torch.Tensor:
    """The released code's order of work: per image, a vision-encoder call and a full W-stream.

    Same arithmetic as ``SAMModel.perceive`` with ``context: all`` (checked in the tests), only
    organised as sam.py organises it: a Python loop over the N images of the batch.
    """
    pixels, mask = batch["pixel_values"], batch["image_mask"]
    b, n = mask.shape
    feats = [model.vision_model(pixel_values=pixels[:, j]).last_hidden_state for j in range(n)]
    stacked = torch.stack(feats, dim=1)
    merged, _ = model.merge_context(stacked, mask)
    nq = model.num_query_tokens
    embeds = model.qformer.embeddings(input_ids=batch["qformer_input_ids"],
                                      query_embeds=model.query_tokens.expand(b, -1, -1))
    mask_2d = torch.cat([batch["qformer_attention_mask"].new_ones(b, nq), batch["qformer_attention_mask"]], 1)
    attn = model._attention_mask(embeds, mask_2d)
    tokens = []
    for j in range(n):
        q, w = embeds, embeds
        for i, layer in enumerate(model.qformer.encoder.layer):
            if i <= model.guide_out_layer:
                if i == model.guide_in_layer:
                    w = w + model.w_in(q)
                w = layer(w, attn, merged, query_length=nq)
                if i == model.guide_out_layer:
                    q = q + model.w_out(w)
            q = layer(q, attn, feats[j], query_length=nq)
        tokens.append(model.language_projection(q[:, :nq]))
    return torch.cat(tokens, dim=1)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def gpu_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def _patches(model: SAMModel) -> int:
    cfg = model.config.vision_config
    return (cfg.image_size // cfg.patch_size) ** 2 + 1


def _vit_flops_per_image(model: SAMModel) -> float:
    return 2 * sum(p.numel() for p in model.vision_model.parameters()) * _patches(model)


def vision_flops(model: SAMModel, batch: dict) -> float:
    """2 x ViT params per patch token of every present image."""
    return _vit_flops_per_image(model) * int(batch["image_mask"].sum())


def useful_flops(model: SAMModel, batch: dict) -> float:
    """2 x ViT params per patch token + 4 x LLM params per LLM token + 6 x trainable params per LLM token."""
    n_images = int(batch["image_mask"].sum())
    llm_tokens = n_images * model.num_query_tokens + int(batch["attention_mask"].sum())
    llm = sum(p.numel() for p in model.language_model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return vision_flops(model, batch) + 4 * llm * llm_tokens + 6 * trainable * llm_tokens


def qformer_layer_flops(model: SAMModel, layer: torch.nn.Module, text_tokens: int) -> float:
    """Matmul FLOPs of one Q-Former layer for one image: queries and prompt through self-attention,
    queries through cross-attention (keys/values projected from every patch) and the query FFN,
    the prompt through the text FFN. Attention-score FLOPs are left out (small at these sizes)."""
    nq, patches = model.num_query_tokens, _patches(model)
    flops = 0.0
    for name, p in layer.named_parameters():
        if name.startswith("attention."):
            flops += 2 * p.numel() * (nq + text_tokens)
        elif name.startswith("crossattention."):
            flops += 2 * p.numel() * (patches if (".key." in name or ".value." in name) else nq)
        elif name.startswith(("intermediate_query.", "output_query.")):
            flops += 2 * p.numel() * nq
        elif name.startswith(("intermediate.", "output.")):
            flops += 2 * p.numel() * text_tokens
    return flops


def perception_flops(model: SAMModel, num_images: int, text_tokens: int) -> tuple[float, float]:
    """(batched, released order) matmul FLOPs of one sample's perception with ``context: all``.

    Both run the ViT and the Q-stream once per image; the released order also runs the W-stream's
    layers 0..k once per image, where we run layers below l once per sample."""
    vit = _vit_flops_per_image(model)
    layers = [qformer_layer_flops(model, layer, text_tokens) for layer in model.qformer.encoder.layer]
    q_stream, l, k = sum(layers), model.guide_in_layer, model.guide_out_layer
    batched = num_images * (vit + q_stream + sum(layers[l:k + 1])) + sum(layers[:l])
    released = num_images * (vit + q_stream + sum(layers[:k + 1]))
    return batched, released


def run(preset: str, batch_size: int, image_counts: list[int], repeats: int, device: torch.device,
        sections: set[str], gen_tokens: int, variant: str = "sam") -> dict:
    report: dict = {"preset": preset, "batch_size": batch_size, "device": describe(device), "sections": {}}
    if variant != "sam":
        report["variant"] = variant
    sam = make_model(variant, preset, device)  # the variant compared with instructblip
    base = make_model("instructblip", preset, device)
    base.load_state_dict(sam.state_dict(), strict=False)  # the same backbone for both
    sam.train()
    base.train()

    if "step" in sections:
        rows = []
        for n in image_counts:
            batch = make_batch(sam, batch_size, n, device)
            t_sam = timeit(train_step(sam, batch), device, repeats)
            t_base = timeit(train_step(base, batch), device, repeats)
            row = {"N": n, f"{variant}_step_s": t_sam, "instructblip_step_s": t_base, "ratio": t_sam / t_base}
            if "generate" in sections:
                gen = dict(max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, num_beams=1, return_ids=True)
                g_sam = timeit(lambda b=batch, g=gen: sam.generate(b, **g), device, max(1, repeats // 2))
                g_base = timeit(lambda b=batch, g=gen: base.generate(b, **g), device, max(1, repeats // 2))
                row.update({f"{variant}_generate_s": g_sam, "instructblip_generate_s": g_base,
                            "generate_ratio": g_sam / g_base})
            if device.type == "cuda":
                flops = useful_flops(sam, batch)
                peak = gpu_peak_tflops(device)
                row["samples_per_s"] = batch_size / t_sam
                row["llm_tokens_per_s"] = (n * sam.num_query_tokens + batch["input_ids"].shape[1]) * batch_size / t_sam
                row["mfu"] = flops / t_sam / (peak * 1e12) if peak else None
            rows.append(row)
            print(json.dumps(row))
        report["sections"][f"{variant}_vs_instructblip"] = rows

    if "perception" in sections:
        rows = []
        sam.eval()
        for n in image_counts:
            batch = make_batch(sam, batch_size, n, device)

            @torch.no_grad()
            def ours(b=batch):
                return sam._visual_tokens(b).visual_tokens

            t_ours = timeit(ours, device, repeats)
            t_rel = timeit(lambda b=batch: released_order(sam, b), device, repeats)
            f_ours, f_rel = perception_flops(sam, n, batch["qformer_input_ids"].shape[1])
            rows.append({"N": n, "batched_s": t_ours, "released_order_s": t_rel, "speedup": t_rel / t_ours,
                         "flop_ceiling": f_rel / f_ours})
            print(json.dumps(rows[-1]))
        report["sections"]["batched_vs_released_order"] = rows
        sam.train()

    if "others" in sections:
        others = make_model("sam", preset, device, context="others").eval()
        rows = []
        for n in (2, 4, 8, 16):
            batch = make_batch(others, batch_size, n, device)
            with torch.no_grad():
                feats = others.encode_images(batch["pixel_values"], batch["image_mask"])

            @torch.no_grad()
            def perceive(b=batch, f=feats):
                return others.perceive(f, b["image_mask"], b["qformer_input_ids"], b["qformer_attention_mask"])

            rows.append({"N": n, "perceive_s": timeit(perceive, device, repeats)})
        for r in rows:
            r["relative_to_N2"] = r["perceive_s"] / rows[0]["perceive_s"]
            print(json.dumps(r))
        report["sections"]["context_others_scaling"] = rows
        del others

    if "cache" in sections:
        rows = []
        for n in image_counts:
            batch = make_batch(sam, batch_size, n, device)
            with torch.no_grad():
                feats = sam.encode_images(batch["pixel_values"], batch["image_mask"])
            cached = {k: v for k, v in batch.items() if k != "pixel_values"} | {"image_embeds": feats}
            t_pix = timeit(train_step(sam, batch), device, repeats)
            t_cache = timeit(train_step(sam, cached), device, repeats)
            total = useful_flops(sam, batch)
            rows.append({"N": n, "pixels_step_s": t_pix, "cached_step_s": t_cache, "speedup": t_pix / t_cache,
                         "flop_ceiling": total / (total - vision_flops(sam, batch))})
            print(json.dumps(rows[-1]))
        report["sections"]["feature_cache"] = rows

    report["peak_memory_mb"] = peak_memory_mb(device)
    return report


def flop_ceilings(preset: str, batch_size: int, image_counts: list[int]) -> dict:
    """The best ratios the FLOP counts allow, from a model on the meta device (no weights, no time):
    batched vs released-order perception, and a training step from cached features vs pixels."""
    sam = build_model(ModelConfig(name="sam", dims=preset), device="meta")
    rows = []
    for n in image_counts:
        batch = make_batch(sam, batch_size, n, torch.device("cpu"))
        f_ours, f_rel = perception_flops(sam, n, batch["qformer_input_ids"].shape[1])
        total, vit = useful_flops(sam, batch), vision_flops(sam, batch)
        rows.append({"N": n, "vit_gflop_per_image": vit / n / batch_size / 1e9,
                     "perception_ceiling": f_rel / f_ours, "vision_share_of_step": vit / total,
                     "cache_ceiling": total / (total - vit)})
    return {"preset": preset, "batch_size": batch_size, "device": "FLOP counts (meta device)",
            "sections": {"flop_ceilings": rows}}


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def to_markdown(report: dict) -> str:
    lines = [f"### preset `{report['preset']}`, batch {report['batch_size']}, {report['device']}", ""]
    for name, rows in report["sections"].items():
        keys = list(rows[0])
        lines += [f"**{name}**", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in rows:
            lines.append("| " + " | ".join(_fmt(r[k]) for k in keys) + " |")
        lines.append("")
    if "peak_memory_mb" in report:
        lines.append(f"peak memory: {report['peak_memory_mb']:.0f} MiB")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    counts = [int(x) for x in args.images.split(",")]
    if args.flops_only:
        report = flop_ceilings(args.preset, args.batch_size, counts)
    else:
        report = run(args.preset, args.batch_size, counts, args.repeats, torch.device(args.device),
                     set(args.sections.split(",")), args.gen_tokens, args.model)
    md = to_markdown(report)
    print(md)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        Path(args.out).with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()

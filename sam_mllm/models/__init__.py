"""Model variants by registry name, and ``build_model`` from a :class:`ModelConfig`.

| name           | paper row (Table 3)      | guidance  | context weights |
|----------------|--------------------------|-----------|-----------------|
| instructblip   | baseline / +DATA         | none      | -               |
| sam_bsg_mean   | +BSG                     | W-former  | plain mean      |
| sam_linear     | +LIN                     | one Linear| adaptive        |
| sam            | SAM                      | W-former  | adaptive        |
| llava_mlp      | (SEA's setting, no SAM)  | none; a GELU MLP per patch instead of the Q-Former |
| vpgc           | +VPG-C                   | none; Cheetah's re-read of the images at a middle LLM layer (models/vpgc.py) |
| mmfs           | - (MM-Interleaved's MMFS)| none + MMFS in the LLM | -  |
| sam_mmfs       | - (SAM + MMFS)           | W-former + MMFS in the LLM | adaptive |

+MMICL is ``instructblip`` with ``trainable`` patterns (configs/train/ablation_mmicl.yaml).

+DATA is ``instructblip`` with ``model.trainable=[language_projection]`` (its default).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch

from sam_mllm.config import ModelConfig
from sam_mllm.models.backbone import (
    BackboneNotFoundError,
    build_from_dims,
    load_pretrained,
    load_tokenizers,
    resolve_dims,
)
from sam_mllm.models.checkpoint import load_lavis_checkpoint, load_trainable, save_trainable
from sam_mllm.models.sam import Perception, SAMModel, SAMOutput
from sam_mllm.registry import register

VARIANTS: dict[str, dict[str, str | bool]] = {
    "instructblip": dict(guidance="none"),
    "sam": dict(guidance="w_former", patch_weighting="adaptive"),
    "sam_bsg_mean": dict(guidance="w_former", patch_weighting="mean"),
    "sam_linear": dict(guidance="linear", patch_weighting="adaptive"),
    "llava_mlp": dict(guidance="none", perceiver="mlp"),
    "vpgc": dict(guidance="none", vpgc=True),
    "mmfs": dict(guidance="none", mmfs=True),
    "sam_mmfs": dict(guidance="w_former", patch_weighting="adaptive", mmfs=True),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_backbone(cfg: ModelConfig, device: torch.device | str | None = None):
    """(backbone, Q-Former tokenizer, LLM tokenizer) as ``cfg`` asks: dims or pretrained weights."""
    dtype = _DTYPES.get(cfg.dtype, torch.float32)  # "paper" loads fp32, then casts (build_model)
    if cfg.dims is None:
        model, qf_tok, llm_tok = load_pretrained(cfg.backbone, dtype, cfg.attn_implementation)
        return model, qf_tok, llm_tok
    dims = resolve_dims(cfg.dims)
    llm_tok = qf_tok = None  # a meta-device model is for sizing only; no text goes through it
    if device is None or torch.device(device).type != "meta":
        if cfg.tokenizer:
            llm_tok, qf_tok = load_tokenizers(cfg.tokenizer)
        else:
            from sam_mllm.models.tokenizers import build_word_tokenizers, default_words

            llm_tok, qf_tok = build_word_tokenizers(default_words())
        for name, tok, size in (("llm_vocab", llm_tok, dims.llm_vocab), ("qformer_vocab", qf_tok, dims.qformer_vocab)):
            if len(tok) > size:
                raise ValueError(f"model.dims.{name}={size} is smaller than its tokenizer ({len(tok)} tokens)")
    with torch.device(device or "cpu"):
        model = build_from_dims(dims, cfg.attn_implementation)
    return model.to(dtype), qf_tok, llm_tok


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> SAMModel:
    """The model a config describes, with its checkpoints loaded and its frozen parts frozen."""
    from sam_mllm.registry import get

    return get("model", cfg.name)(cfg, device=device)


def _build_variant(variant: str, cfg: ModelConfig, device: torch.device | str | None = None) -> SAMModel:
    backbone, qf_tok, llm_tok = build_backbone(cfg, device)
    options = dict(VARIANTS[variant])
    if options.pop("mmfs", False):
        mmfs = cfg.mmfs
        options["mmfs"] = dataclasses.asdict(mmfs) if dataclasses.is_dataclass(mmfs) else dict(mmfs)
    with torch.device(device or backbone.language_projection.weight.device):
        model = SAMModel(
            backbone, qf_tok, llm_tok, **options, context=cfg.context,
            guide_in_layer=cfg.guide_in_layer, guide_out_layer=cfg.guide_out_layer,
            trainable=cfg.trainable, max_images=cfg.max_images,
            gradient_checkpointing=cfg.gradient_checkpointing, vpgc_layer=cfg.vpgc_layer,
        )
    # Trainable layers stay float32 under a bf16 backbone: the optimizer works on them.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if cfg.lavis_checkpoint:
        load_lavis_checkpoint(model, cfg.lavis_checkpoint)
    if cfg.checkpoint:
        load_trainable(model, cfg.checkpoint)
    if cfg.dtype == "paper":
        if torch.cuda.is_available() and torch.device(device or "cpu").type != "meta":
            model.use_paper_precision()
        else:
            print("model.dtype=paper needs a GPU (fp16 under autocast); running in float32 here")
    return model.eval()


for _name in VARIANTS:
    register("model", _name)(partial(_build_variant, _name))


__all__ = [
    "BackboneNotFoundError", "Perception", "SAMModel", "SAMOutput", "VARIANTS", "build_backbone",
    "build_model", "load_lavis_checkpoint", "load_trainable", "save_trainable",
]

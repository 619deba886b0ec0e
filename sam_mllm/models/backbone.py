"""The frozen backbone: transformers' InstructBLIP, from a hub id, a local directory, or dimensions.

Every route ends in the same ``InstructBlipForConditionalGeneration`` class, so a tiny model
runs exactly the code that the 7B model runs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerBase,
)

from sam_mllm.config import ConfigError
from sam_mllm.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
# The embedded default backbone (scripts/pretrain_tiny_backbone.py).
TINY_BACKBONE = REPO_ROOT / "sam_mllm" / "assets" / "tiny_backbone"


class BackboneNotFoundError(UserError, FileNotFoundError):
    """The requested weights are not on this machine and cannot be downloaded."""


@dataclass
class BackboneDims:
    """Dimensions of an InstructBLIP-Vicuna backbone built with random weights."""

    image_size: int = 224
    patch_size: int = 14
    vision_hidden: int = 1408
    vision_layers: int = 39
    vision_heads: int = 16
    vision_intermediate: int = 6144
    qformer_hidden: int = 768
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_intermediate: int = 3072
    qformer_vocab: int = 30523
    qformer_max_positions: int = 512
    cross_attention_frequency: int = 2
    num_query_tokens: int = 32
    llm_hidden: int = 4096
    llm_layers: int = 32
    llm_heads: int = 32
    llm_kv_heads: int = 32
    llm_intermediate: int = 11008
    llm_vocab: int = 32001
    llm_max_positions: int = 2048
    vision_layer_norm_eps: float = 1e-6
    qformer_layer_norm_eps: float = 1e-12


# ``7b`` is InstructBLIP-Vicuna-7B exactly; ``base`` keeps the real widths with few layers so that
# benchmarks of realistic per-layer cost run on a CPU; ``tiny`` matches the Q-Former of the
# released-code fixture (width 64, 4 layers, 8 queries, vision width 48, P = 17 patches); its
# vocabularies fit the synthetic world's word tokenizers.
DIMS_PRESETS: dict[str, BackboneDims] = {
    "7b": BackboneDims(),
    "base": BackboneDims(vision_layers=2, qformer_layers=12, llm_layers=2),
    "tiny": BackboneDims(
        image_size=32, patch_size=8, vision_hidden=48, vision_layers=2, vision_heads=4,
        vision_intermediate=96, qformer_hidden=64, qformer_layers=4, qformer_heads=4,
        qformer_intermediate=128, qformer_vocab=512, qformer_max_positions=128, num_query_tokens=8,
        llm_hidden=96, llm_layers=2, llm_heads=4, llm_kv_heads=4, llm_intermediate=192, llm_vocab=512,
        llm_max_positions=512,
    ),
    # The embedded default's backbone (sam_mllm/assets/tiny_backbone): 64 px images, and only 4
    # query tokens per image, so one image's tokens cannot describe every object it shows.
    "demo": BackboneDims(
        image_size=64, patch_size=8, vision_hidden=128, vision_layers=4, vision_heads=4,
        vision_intermediate=256, qformer_hidden=128, qformer_layers=4, qformer_heads=4,
        qformer_intermediate=256, qformer_vocab=512, qformer_max_positions=128, num_query_tokens=4,
        llm_hidden=128, llm_layers=3, llm_heads=4, llm_kv_heads=4, llm_intermediate=256, llm_vocab=512,
        llm_max_positions=512,
    ),
}


def resolve_dims(dims: Any) -> BackboneDims:
    """A preset name, a mapping (optionally with ``preset``), or a BackboneDims."""
    if isinstance(dims, BackboneDims):
        return dims
    if isinstance(dims, str):
        if dims not in DIMS_PRESETS:
            raise ConfigError(f"model.dims: unknown preset {dims!r}; presets: {', '.join(DIMS_PRESETS)}")
        return DIMS_PRESETS[dims]
    if isinstance(dims, dict) or hasattr(dims, "items"):
        values = dict(dims)
        base = resolve_dims(values.pop("preset", "7b"))
        known = {f.name for f in fields(BackboneDims)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"model.dims: unknown key(s) {unknown}; known: {sorted(known)}")
        return BackboneDims(**{**asdict(base), **values})
    raise ConfigError(f"model.dims must be a preset name or a mapping, got {type(dims).__name__}")


def instructblip_config(dims: BackboneDims, attn_implementation: str = "sdpa") -> InstructBlipConfig:
    vision = InstructBlipVisionConfig(
        hidden_size=dims.vision_hidden, num_hidden_layers=dims.vision_layers,
        num_attention_heads=dims.vision_heads, intermediate_size=dims.vision_intermediate,
        image_size=dims.image_size, patch_size=dims.patch_size, layer_norm_eps=dims.vision_layer_norm_eps,
    )
    qformer = InstructBlipQFormerConfig(
        vocab_size=dims.qformer_vocab, hidden_size=dims.qformer_hidden,
        num_hidden_layers=dims.qformer_layers, num_attention_heads=dims.qformer_heads,
        intermediate_size=dims.qformer_intermediate, max_position_embeddings=dims.qformer_max_positions,
        cross_attention_frequency=dims.cross_attention_frequency, encoder_hidden_size=dims.vision_hidden,
        layer_norm_eps=dims.qformer_layer_norm_eps,
    )
    text = LlamaConfig(
        vocab_size=dims.llm_vocab, hidden_size=dims.llm_hidden, num_hidden_layers=dims.llm_layers,
        num_attention_heads=dims.llm_heads, num_key_value_heads=dims.llm_kv_heads,
        intermediate_size=dims.llm_intermediate, max_position_embeddings=dims.llm_max_positions,
        rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    config = InstructBlipConfig(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=dims.num_query_tokens,
    )
    config._attn_implementation = attn_implementation
    for sub in (config.vision_config, config.qformer_config, config.text_config):
        sub._attn_implementation = attn_implementation
    return config


def build_from_dims(dims: Any, attn_implementation: str = "sdpa") -> InstructBlipForConditionalGeneration:
    """Random-weight backbone of the given dimensions (use ``torch.device('meta')`` to size 7B)."""
    config = instructblip_config(resolve_dims(dims), attn_implementation)
    return InstructBlipForConditionalGeneration(config)


def locate_weights(name_or_path: str, *, what: str, setting: str, error: type[Exception],
                   marker: str = "config.json", alternatives: str = "") -> Path:
    """A local folder as is, or the cached snapshot of a hub id; downloaded only when online.

    Every failure is one ``error`` naming ``what`` and how to provide the weights (``setting`` is the
    config key that takes a local copy). Shared by the backbone, SEA's CLIP and the MmLINK stages.
    """
    path = Path(name_or_path).expanduser()
    if not path.is_absolute() and not path.is_dir() and (REPO_ROOT / path).is_dir():
        path = REPO_ROOT / path  # repo-relative paths (configs name sam_mllm/assets/...) work from anywhere
    if path.is_dir():
        if not (path / marker).is_file():
            raise error(f"{what}: folder {path} has no {marker}")
        return path
    if path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") != 1:
        raise error(f"{what} {name_or_path!r}: no such folder, and it is not a Hugging Face id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name_or_path, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    hint = (f"{what}: weights of {name_or_path!r} not found in the Hugging Face cache "
            f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}). "
            f"Provide them by one of: (1) on a machine with internet, `huggingface-cli download {name_or_path}` "
            f"(or let the first run download them) and copy the cache; (2) set {setting}=/path/to/a/local/copy "
            f"(a folder with {marker} and the weights, e.g. from `save_pretrained`){alternatives}.")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise error(hint + " HF_HUB_OFFLINE is set, so nothing was downloaded.")
    try:
        return Path(snapshot_download(name_or_path, etag_timeout=10))
    except Exception as exc:  # network errors come in many classes; the cause is kept below
        # The hub's own message runs over several lines; its first says what failed (--debug shows all).
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise error(hint + f" Download failed: {type(exc).__name__}: {first}") from exc


def _locate(name_or_path: str) -> Path:
    return locate_weights(name_or_path, what="backbone", setting="model.backbone", error=BackboneNotFoundError,
                          alternatives="; (3) for experiments without weights, model.dims=tiny")


def load_pretrained(
    name_or_path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> tuple[InstructBlipForConditionalGeneration, PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
    """Backbone and its two tokenizers (LLM at the root, Q-Former in ``qformer_tokenizer/``)."""
    path = _locate(name_or_path)
    model = InstructBlipForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation
    )
    llm_tokenizer, qformer_tokenizer = load_tokenizers(path)
    return model, qformer_tokenizer, llm_tokenizer


def load_tokenizers(path: str | Path) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
    """(LLM tokenizer, Q-Former tokenizer) saved in the Hugging Face InstructBLIP layout."""
    path = Path(path)
    if not (path / "qformer_tokenizer").is_dir():
        raise BackboneNotFoundError(f"{path} has no qformer_tokenizer/ folder (InstructBLIP processor layout)")
    llm = AutoTokenizer.from_pretrained(path)
    qformer = AutoTokenizer.from_pretrained(path / "qformer_tokenizer")
    return llm, qformer


def export_backbone(model, path: str | Path) -> Path:
    """Save a model's backbone as a Hugging Face InstructBLIP directory (weights + both tokenizers).

    The result loads with ``model.backbone=<path>`` exactly like a hub checkpoint; SAM's own
    layers are not part of it (they are what training adds).
    """
    path = Path(path)
    backbone = InstructBlipForConditionalGeneration(model.config)
    own = {k: v for k, v in model.state_dict().items() if k in backbone.state_dict()}
    missing, unexpected = backbone.load_state_dict(own, strict=False)
    if missing:
        raise ValueError(f"cannot export: the model lacks backbone weights {missing[:5]}")
    backbone.save_pretrained(path)
    if model.llm_tokenizer is not None:
        model.llm_tokenizer.save_pretrained(path)
        model.qformer_tokenizer.save_pretrained(path / "qformer_tokenizer")
    return path

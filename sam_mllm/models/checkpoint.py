"""Checkpoints: the released LAVIS-format state dicts in, our small adapter files in and out.

LAVIS names (``visual_encoder.*``, ``ln_vision``, ``Qformer.bert.*``, ``llm_proj``, ``llm_model.*``
and SAM's ``attn``, ``one_2_muliple.0``, ``multiple_2_one.0``) are renamed to the Hugging Face
InstructBLIP names our model uses; EVA's separate q/v biases become one qkv bias.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from sam_mllm.errors import UserError

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "config.yaml"

# Ordered (pattern, replacement) rules; the first that matches renames the key.
_LAVIS_RULES: list[tuple[str, str]] = [
    (r"^attn\.", "patch_weight."),
    (r"^Qformer\.bert\.encoder\.one_2_muliple\.0\.", "w_in."),
    (r"^Qformer\.bert\.encoder\.multiple_2_one\.0\.", "w_out."),
    (r"^llm_proj\.", "language_projection."),
    (r"^llm_model\.", "language_model."),
    (r"^query_tokens$", "query_tokens"),
    (r"^ln_vision\.", "vision_model.post_layernorm."),
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight$", r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.embeddings.layernorm."),
    (r"^Qformer\.bert\.", "qformer."),
]
# Present in LAVIS state dicts but not parameters of ours (buffers, the unused MLM head).
_LAVIS_DROP = re.compile(r"^(Qformer\.bert\.embeddings\.position_ids|Qformer\.cls\.)")
_QV_BIAS = re.compile(r"^visual_encoder\.blocks\.(\d+)\.attn\.([qv])_bias$")


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not fit the model: names the file and the keys."""


def convert_lavis_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """LAVIS / released-SAM names -> our (Hugging Face InstructBLIP) names."""
    out: dict[str, Tensor] = {}
    qv: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in state.items():
        if _LAVIS_DROP.match(key):
            continue
        m = _QV_BIAS.match(key)
        if m:
            qv.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        for pattern, repl in _LAVIS_RULES:
            if re.match(pattern, key):
                new = re.sub(pattern, repl, key)
                # BERT's ``attention.self`` is ``attention.attention`` in transformers' Q-Former.
                new = new.replace("attention.self.", "attention.attention.")
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"LAVIS state dict has keys with no known mapping: {unknown[:10]}"
                              + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else ""))
    for layer, biases in qv.items():
        if set(biases) != {"q", "v"}:
            raise CheckpointError(f"visual_encoder.blocks.{layer}.attn: q_bias and v_bias must come together")
        # EVA has no key bias; transformers stores q|k|v biases as one vector with zeros for k.
        out[f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"] = torch.cat(
            [biases["q"], torch.zeros_like(biases["v"]), biases["v"]]
        )
    return out


def load_lavis_checkpoint(model: torch.nn.Module, path: str | Path | dict, strict: bool = False) -> list[str]:
    """Load a LAVIS-format checkpoint (file path or state dict) into ``model``.

    Released checkpoints hold only what their authors trained (no ViT or LLM), so by default missing
    keys are allowed and returned; ``strict=True`` demands every parameter. Unexpected or
    mis-shaped keys are always an error.
    """
    source = "state dict" if isinstance(path, dict) else str(path)
    if isinstance(path, dict):
        state = path
    else:
        if not Path(path).is_file():
            raise CheckpointError(f"LAVIS checkpoint not found: {path}")
        raw = load_pickled_weights(path)
        state = raw.get("model", raw) if isinstance(raw, dict) else raw
    converted = convert_lavis_state_dict(state)
    return _load_into(model, converted, source, strict)


def load_pickled_weights(path: str | Path) -> object:
    """``torch.load`` of a ``.pth`` file that may come from anyone: tensors and plain data only.

    A file that holds other Python objects (which could run code while unpickling) is refused with a
    one-line :class:`CheckpointError` instead of an ``UnpicklingError`` traceback.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refusing to load: the file holds Python objects besides tensors and "
                              f"plain data, and unpickling them could run code ({unpickling_detail(exc)})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {' '.join(str(exc).split())}") from None


def unpickling_detail(exc: BaseException) -> str:
    """The one informative line of torch's weights-only refusal (which object it met), without its advice."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = next((x for x in lines if "GLOBAL" in x or "Unsupported" in x), lines[0] if lines else type(exc).__name__)
    return line.split(" Please use")[0].removeprefix("WeightsUnpickler error: ")


def state_dict_mismatch(own: dict[str, Tensor], state: dict[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    """How ``state`` fits a model whose state dict is ``own`` (a meta-device model's will do):
    (keys the model lacks, ``"key: checkpoint (..) vs model (..)"`` shape mismatches, keys ``state`` lacks)."""
    unexpected = sorted(set(state) - set(own))
    bad_shape = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    return unexpected, bad_shape, sorted(set(own) - set(state))


def _load_into(model: torch.nn.Module, state: dict[str, Tensor], source: str, strict: bool) -> list[str]:
    unexpected, bad_shape, missing = state_dict_mismatch(model.state_dict(), state)
    if unexpected:
        raise CheckpointError(f"{source}: keys not in the model: {unexpected[:10]}")
    if bad_shape:
        raise CheckpointError(f"{source}: shape mismatch: {bad_shape[:5]}")
    if strict and missing:
        raise CheckpointError(f"{source}: missing keys: {missing[:10]} (+{max(0, len(missing) - 10)} more)")
    model.load_state_dict(state, strict=False)
    return missing


def save_trainable(model: torch.nn.Module, directory: str | Path, config_yaml: str | None = None) -> Path:
    """Trainable parameters as ``adapter.safetensors`` (+ the config that built the model).

    Written to a temporary name and renamed, so a crash never leaves a half-written file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    atomic_write(directory / ADAPTER_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "sam_mllm"}))
    if config_yaml is not None:
        atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(config_yaml))
    return directory / ADAPTER_FILE


def load_trainable(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Load an adapter file (or a folder holding one); every key must exist in the model."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    state = load_file(str(path))
    device = next(model.parameters()).device
    return _load_into(model, {k: v.to(device) for k, v in state.items()}, str(path), strict=False)


def atomic_write(target: Path, write: Callable[[str], object]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``target``, then rename it over ``target``."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # on disk before the rename, so a power cut cannot leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))

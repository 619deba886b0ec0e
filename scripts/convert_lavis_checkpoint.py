"""Convert a LAVIS-format checkpoint (e.g. the released SAM weights) into our adapter folder.

    python scripts/convert_lavis_checkpoint.py --src sam_checkpoint.pth --out checkpoints/sam_released \
        [--config configs/models/sam_vicuna7b.yaml] [--dims 7b] [key=value ...]

The names are mapped as ``model.lavis_checkpoint`` maps them on load, then checked against the
model the config describes, built on the meta device at ``--dims`` (no backbone weights are read).
Every converted tensor is written to ``adapter.safetensors`` beside the config, so the folder
loads with ``model.checkpoint=DIR`` or ``sam_mllm.load_model(checkpoint=DIR)`` without
converting again.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from safetensors.torch import save_file

from sam_mllm.config import load_config, to_yaml
from sam_mllm.models import build_model
from sam_mllm.models.checkpoint import (
    ADAPTER_FILE,
    CONFIG_FILE,
    CheckpointError,
    atomic_write,
    convert_lavis_state_dict,
    load_pickled_weights,
    state_dict_mismatch,
)


def convert(src: Path, out: Path, config: str, dims: str, overrides: list[str]) -> Path:
    if not src.is_file():
        raise CheckpointError(f"LAVIS checkpoint not found: {src}")
    raw = load_pickled_weights(src)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{src}: expected a state dict (or {{'model': state dict}}), not {type(raw).__name__}")
    state = convert_lavis_state_dict(raw.get("model", raw))
    cfg = load_config(config, overrides)
    # Shapes come from a weightless model of the same variant and dimensions.
    sizing = build_model(dataclasses.replace(cfg.model, dims=dims, lavis_checkpoint=None, checkpoint=None),
                         device="meta")
    unexpected, bad, _ = state_dict_mismatch(sizing.state_dict(), state)
    if unexpected:
        raise CheckpointError(f"{src}: keys not in a {cfg.model.name} model: {unexpected[:10]}")
    if bad:
        raise CheckpointError(f"{src}: shapes do not fit dims={dims}: {bad[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in state.items()}
    atomic_write(out / ADAPTER_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "sam_mllm",
                                                                               "source": str(src)}))
    cfg.model.lavis_checkpoint = None
    atomic_write(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(to_yaml(cfg)))
    return out / ADAPTER_FILE


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, required=True, help="LAVIS .pth file")
    p.add_argument("--out", type=Path, required=True, help="folder for adapter.safetensors + config.yaml")
    p.add_argument("--config", default="configs/models/sam_vicuna7b.yaml")
    p.add_argument("--dims", default="7b", help="dimension preset the checkpoint must fit")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    path = convert(args.src, args.out, args.config, args.dims, args.overrides)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as exc:  # one line, never a traceback (e.g. a refused pickle payload)
        raise SystemExit(f"error: {exc}") from None

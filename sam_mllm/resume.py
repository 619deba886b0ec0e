"""Training checkpoints that survive kills, full disks and hostile files.

A checkpoint folder ``checkpoints/step_NNNNNNN`` holds the trainable weights (``adapter.safetensors``)
and the resume state (``state.pt``: step, optimizer, RNG states). The resume state holds only
tensors and plain Python data, so it loads with ``torch.load(..., weights_only=True)``: a crafted
``state.pt`` cannot run code, it is refused with a one-line error. Both files are written into
``step_NNNNNNN.tmp``, flushed to disk (``fsync``), and the folder is renamed into place, so a folder
with the final name is always complete; ``.tmp`` leftovers of a killed save are removed on the next
start and never chosen for resuming.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sam_mllm.errors import UserError
from sam_mllm.models.checkpoint import unpickling_detail

STATE_FILE = "state.pt"
ADAPTER_FILE = "adapter.safetensors"
_NAME = re.compile(r"^step_(\d{7})$")


class ResumeStateError(UserError, ValueError):
    """A resume state that cannot (or must not) be loaded; names the file."""


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as tensors, lists and numbers (no pickled objects)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state(path: Path) -> dict:
    """The resume state in ``path``, loaded without executing anything from the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ResumeStateError(
            f"{path}: refusing to load: it holds Python objects besides tensors and plain data, and unpickling "
            f"them could run code (not written by this version of sam_mllm, or tampered with): "
            f"{unpickling_detail(exc)}") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise ResumeStateError(f"{path}: unreadable resume state: {_one_line(exc)}") from None
    if not isinstance(state, dict) or not {"step", "optimizer", "rng"} <= set(state):
        raise ResumeStateError(f"{path}: not a sam_mllm resume state (expected step, optimizer and rng)")
    return state


def save_state(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from, or None when it is complete and finite."""
    if not (path / ADAPTER_FILE).is_file() or not (path / STATE_FILE).is_file():
        return f"it lacks {ADAPTER_FILE} or {STATE_FILE}"
    try:
        weights = load_file(str(path / ADAPTER_FILE))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        return f"{ADAPTER_FILE} is unreadable ({_one_line(exc)})"
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        return f"its weights are not finite ({', '.join(bad[:3])})"
    try:
        load_state(path / STATE_FILE)
    except ResumeStateError as exc:
        return str(exc)
    return None


def complete_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders with their final name (``step_NNNNNNN``), oldest first; unverified."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name) and p.is_dir())


def latest_good_checkpoint(folder: Path, say=print) -> Path | None:
    """The newest checkpoint that loads and is finite; every newer one that does not is named via ``say``."""
    for path in reversed(complete_checkpoints(folder)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        say(f"skipping checkpoint {path}: {problem}")
    return None


def remove_stale(folder: Path) -> list[Path]:
    """Delete ``*.tmp`` leftovers of saves that were killed; returns what was removed."""
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__

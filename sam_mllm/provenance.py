"""What produced an evaluation folder's predictions, and who is writing it now.

Predictions are resumed across runs (a killed evaluation continues where it stopped), so a folder
must never mix or reuse predictions of another model. Each dataset folder records a fingerprint
(``fingerprint.json``): the model config, SHA-256 of the checkpoint files it names and of the
trainable weights actually in memory, the generation settings, the image loading mode and the
SHA-256 of the annotations file. A rerun with a different fingerprint is refused (or, with
``eval.restart=true``, starts over). A lock file (``flock``, released by the OS when the process
dies) keeps a second evaluation out of a folder that one is writing, naming the holder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
from pathlib import Path

import torch

from sam_mllm.config import Config, ConfigError

FINGERPRINT_FILE = "fingerprint.json"
LOCK_FILE = ".evaluate.lock"


class OutputFolderError(ConfigError):
    """An output folder that holds results of another setup, or that another process is writing."""


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """Digest of the trainable parameters (names, dtypes, shapes and bytes) as they are in memory."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def eval_fingerprint(cfg: Config, model: torch.nn.Module, annotations: Path) -> dict:
    """Everything that decides a prediction's text, as plain JSON data."""
    model_cfg = dataclasses.asdict(cfg.model)
    files = {}
    for key in ("checkpoint", "lavis_checkpoint"):
        path = model_cfg.pop(key)
        if path:
            files[key] = file_sha256(path) if Path(path).is_file() else str(path)
    generation = dataclasses.asdict(cfg.generation)
    if generation.get("do_sample"):
        generation["seed"] = cfg.seed
    data = getattr(cfg, "data", None)
    return {
        "model": model_cfg,
        "checkpoint_files": files,
        "trainable_weights": weights_sha256(model),
        "generation": generation,
        "image_mode": getattr(data, "image_mode", "released"),
        "annotations": file_sha256(annotations) if annotations.is_file() else None,
    }


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two fingerprints."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def check_fingerprint(folder: Path, fingerprint: dict, has_predictions: bool, restart: bool,
                      clear: list[Path]) -> str | None:
    """Record ``fingerprint`` for ``folder``; refuse earlier predictions that another setup made.

    Returns a notice to print (or None). With ``restart`` the files in ``clear`` are deleted
    instead of refusing. Predictions without any fingerprint (written before fingerprints existed)
    are kept, with a notice.
    """
    path = folder / FINGERPRINT_FILE
    notice = None
    if has_predictions:
        if path.is_file():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                old = {}
            diff = differences(old, fingerprint) if isinstance(old, dict) else ["(unreadable fingerprint)"]
        else:
            diff = None
        if diff and not restart:
            raise OutputFolderError(
                f"{folder}: its predictions were made with a different {', '.join(diff[:6])} "
                f"(see {FINGERPRINT_FILE}); refusing to reuse or mix them. Use another output_dir, or set "
                "eval.restart=true to delete them and start over")
        if diff:
            for p in clear:
                p.unlink(missing_ok=True)
            notice = f"{folder}: eval.restart=true: deleted the predictions of a different {', '.join(diff[:6])}"
        elif diff is None:
            notice = (f"{folder}: predictions without a {FINGERPRINT_FILE} (an older version wrote them) are "
                      "reused as this model's; set eval.restart=true to start over")
    write_fingerprint(folder, fingerprint)
    return notice


def write_fingerprint(folder: Path, fingerprint: dict) -> None:
    """Record what made the predictions in ``folder`` (also for predictions that came from a file)."""
    path = Path(folder) / FINGERPRINT_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
    os.replace(tmp, path)


class FolderLock:
    """An exclusive lock on a folder, held while the process lives; names its holder.

    ``wait=False`` (output folders): a held lock is an error naming the holder. ``wait=True`` (shared
    caches): block until the holder is done, since its work is what this process would redo.
    """

    def __init__(self, folder: Path, name: str = LOCK_FILE, wait: bool = False) -> None:
        self.path = Path(folder) / name
        self.wait = wait
        self.fd: int | None = None

    def acquire(self) -> FolderLock:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no protection, as before
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise OutputFolderError(f"{self.path.parent} is being written by {holder} (lock file {self.path}); "
                                    "wait for it to finish, or use another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the file stays: deleting it would let two processes lock different files
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

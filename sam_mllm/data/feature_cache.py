"""On-disk, memory-mapped cache of frozen vision-encoder features.

The vision encoder is frozen and, with the deterministic evaluation transform, sees the same pixels
every epoch, so its output can be computed once. Entries are keyed by the image file (path, size,
modification time), and each cache folder belongs to one (backbone, transform) pair, so a changed
image, transform or backbone never reads stale features. Rows live in ``.npy`` shards opened with
``mmap_mode='r'``: training reads only the rows it needs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sam_mllm.data.schema import DataError

INDEX = "index.json"


def backbone_fingerprint(model) -> str:
    """Identifies the vision encoder's weights: a digest of cheap per-tensor statistics."""
    h = hashlib.sha1()
    for name, p in model.vision_model.state_dict().items():
        flat = p.detach().flatten().double()
        h.update(name.encode())
        h.update(repr((tuple(p.shape), str(p.dtype), float(flat.sum()), float(flat.abs().sum()))).encode())
        h.update(flat[:8].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def pixels_fingerprint(transform, image_mode: str = "released") -> str:
    """Identifies the pixels an encoder sees: the transform's fingerprint and, unless it is the default
    ``released``, the image mode (``data.image_mode``: other decoding, other pixels)."""
    return transform.fingerprint if image_mode == "released" else f"{transform.fingerprint}-{image_mode}"


def file_key(path: str | Path) -> str:
    st = os.stat(path)
    return f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"


class FeatureCache:
    def __init__(self, root: str | Path, backbone: str, transform: str, dtype: str = "float32") -> None:
        self.backbone, self.transform, self.dtype = backbone, transform, dtype
        digest = hashlib.sha1(f"{backbone}|{transform}|{dtype}".encode()).hexdigest()[:16]
        self.dir = Path(root) / digest
        self.index = self._read_index()
        self._shards: dict[str, np.ndarray] = {}

    def _read_index(self) -> dict:
        path = self.dir / INDEX
        if path.is_file():
            return json.loads(path.read_text())
        return {"backbone": self.backbone, "transform": self.transform, "dtype": self.dtype, "rows": {},
                "shards": []}

    def missing(self, paths: Sequence[str | Path], where: Mapping[Path, str] | None = None) -> list[Path]:
        seen, out = set(), []
        for p in paths:
            key = self._key(p, (where or {}).get(Path(p), ""))
            if key not in self.index["rows"] and key not in seen:
                seen.add(key)
                out.append(Path(p))
        return out

    def build(self, paths: Sequence[str | Path], encode: Callable[[list[Path]], torch.Tensor],
              batch_size: int = 16, where: Mapping[Path, str] | None = None, desc: str = "feature cache") -> int:
        """Compute and store features of the images not cached yet; returns how many were added.

        ``encode`` maps a list of image files to features [n, P, Dv]. The new rows go to a new
        shard, and the index is replaced atomically only after the shard is complete, so a crash
        leaves the previous cache valid.
        """
        if not self.missing(paths, where):  # where: path -> its sample, for errors
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        # Several processes (one per seed, say) may share a cache folder. Building holds the folder's
        # lock and rereads the index under it, so two builders never write the same shard name and
        # neither drops the other's rows; a waiting process then encodes only what is still missing.
        from sam_mllm.provenance import FolderLock

        with FolderLock(self.dir, name=".build.lock", wait=True):
            self.index = self._read_index()
            todo = self.missing(paths, where)
            if not todo:
                return 0
            shard_name = f"features_{len(self.index['shards']):04d}.npy"
            shard = None
            rows = {}
            for start in tqdm(range(0, len(todo), batch_size), desc=desc, unit="batch"):
                chunk = todo[start : start + batch_size]
                feats = encode(chunk).detach().float().cpu().numpy().astype(self.dtype)
                if shard is None:
                    shard = np.lib.format.open_memmap(self.dir / (shard_name + ".tmp"), mode="w+",
                                                      dtype=self.dtype, shape=(len(todo), *feats.shape[1:]))
                shard[start : start + len(chunk)] = feats
                for i, p in enumerate(chunk):
                    rows[file_key(p)] = [shard_name, start + i]
            shard.flush()
            del shard
            os.replace(self.dir / (shard_name + ".tmp"), self.dir / shard_name)
            self.index["shards"].append(shard_name)
            self.index["rows"].update(rows)
            tmp = self.dir / (INDEX + ".tmp")
            tmp.write_text(json.dumps(self.index))
            os.replace(tmp, self.dir / INDEX)
        return len(todo)

    def _key(self, path: str | Path, where: str) -> str:
        try:
            return file_key(path)
        except FileNotFoundError:
            raise DataError(f"{where}image file not found: {path}") from None
        except OSError as exc:
            raise DataError(f"{where}unreadable image {path}: {exc}") from None

    def get(self, path: str | Path, where: str = "") -> torch.Tensor:
        """Features of ``path``; ``where`` (e.g. ``"annotations.json: sample id 3: "``) prefixes errors."""
        key = self._key(path, where)
        try:
            shard_name, row = self.index["rows"][key]
        except KeyError:
            raise DataError(f"{where}feature cache {self.dir} has no entry for {path} (was the file changed "
                            "after the cache was built? rerun with train.feature_cache to add it)") from None
        if shard_name not in self._shards:
            self._shards[shard_name] = np.load(self.dir / shard_name, mmap_mode="r")
        return torch.from_numpy(np.array(self._shards[shard_name][row], dtype=np.float32))

"""Patch labellers for SEA: per image, the top-n label words of every ViT patch and their S_norm.

A labeller maps image files to a tensor [n_images, P-1, top_n, 2] holding, per patch (row-major,
CLS excluded) and rank, the word's index in ``labeller.words`` (-1 = no label) and its normalised
score (Eq. 7). The result is cached on disk with the feature cache's machinery, in a folder keyed by
the labeller's fingerprint, the image transform's and the image mode (``build_label_cache``).

- ``oracle``: the synthetic world's ground truth. The generator writes every image's context and
  object placements (``scenes.json``); the objects are re-rendered with the generator's own sprite
  function and a word's score on a patch is the visible area it covers there (colour, shape and
  pattern words of each object, the context word for the background).
- ``clip``: a transformers ``CLIPModel`` (Hugging Face id or local folder) and a word list, Eqs. 4-6 of
  the paper, fed the library's own transform so that CLIP's patch grid is the backbone's patch grid.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from sam_mllm.data.feature_cache import FeatureCache, pixels_fingerprint
from sam_mllm.data.processing import ImageTransform, load_image
from sam_mllm.objectives.sea import normalize_scores, patch_labels

LABELLERS = ("oracle", "clip")


class LabellerError(ValueError):
    """A labeller that cannot be built or cannot label an image; names the model, file or word."""


def world_label_words() -> list[str]:
    """The synthetic world's label vocabulary: colours, shapes, patterns (not 'plain'), contexts."""
    from sam_mllm.data.synthetic import COLOURS, CONTEXTS, PATTERNS, SHAPES

    return [*COLOURS, *SHAPES, *(p for p in PATTERNS if p != "plain"), *CONTEXTS]


def read_word_list(path: str | Path) -> list[str]:
    """One word per line (blank lines and '#' comments skipped), duplicates are an error."""
    path = Path(path)
    if not path.is_file():
        raise LabellerError(f"sea.word_list: file not found: {path}")
    words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines()]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise LabellerError(f"sea.word_list {path}: no words")
    dup = sorted({w for w in words if words.count(w) > 1}) if len(set(words)) != len(words) else []
    if dup:
        raise LabellerError(f"sea.word_list {path}: duplicated word(s) {dup[:8]}")
    return words


def _pack(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """[..., n] ids and scores -> [..., n, 2] (word id, S_norm), the cached layout."""
    return torch.stack([ids.float(), normalize_scores(scores)], dim=-1)


class OracleLabeller:
    """Exact patch labels of synthetic-world images from the generator's recorded scenes."""

    def __init__(self, grid: int, top_n: int = 10, image_mode: str = "released") -> None:
        self.grid, self.top_n = grid, top_n
        self.image_mode = image_mode  # reads no pixels, but the cache is keyed by it like every labeller
        self.words = world_label_words()
        self.index = {w: i for i, w in enumerate(self.words)}
        self.fingerprint = f"oracle-v1-g{grid}-n{top_n}"

    def coverage(self, file: str | Path) -> np.ndarray:
        """[grid*grid, len(words)] visible area fraction of every label word on every patch."""
        from sam_mllm.data.synthetic import SCENES_FILE, render_object

        file = Path(file)
        scenes_file = file.parent.parent / SCENES_FILE
        scenes = _read_scenes(str(scenes_file.resolve())) if scenes_file.is_file() else None
        rel = f"{file.parent.name}/{file.name}"
        if scenes is None or rel not in scenes["scenes"]:
            raise LabellerError(f"oracle labeller: no scene for {file} in {scenes_file} (only images of the "
                                "synthetic world, generated with its scenes.json, have oracle labels)")
        scene, size = scenes["scenes"][rel], scenes["image_size"]
        visible_bg = np.ones((size, size))
        layers = []
        for p in reversed(scene["objects"]):  # drawn last = on top
            alpha = np.zeros((size, size))
            sprite = np.asarray(render_object(*p["obj"], p["d"], p["angle"]).getchannel("A"), dtype=np.float64) / 255
            x, y, d = p["x"], p["y"], p["d"]
            alpha[y:y + d, x:x + d] = sprite[: size - y, : size - x]
            layers.append((p["obj"], alpha * visible_bg))
            visible_bg = visible_bg * (1 - alpha)
        edges = np.round(np.arange(self.grid + 1) * size / self.grid).astype(int)

        def pool(a: np.ndarray) -> np.ndarray:  # mean over each patch's pixels, row-major patches
            sums = np.add.reduceat(np.add.reduceat(a, edges[:-1], axis=0), edges[:-1], axis=1)
            return (sums / np.outer(np.diff(edges), np.diff(edges))).reshape(-1)

        cov = np.zeros((self.grid * self.grid, len(self.words)))
        cov[:, self.index[scene["context"]]] += pool(visible_bg)
        for (shape, colour, pattern), vis in layers:
            area = pool(vis)
            for w in (colour, shape, pattern):
                if w in self.index:
                    cov[:, self.index[w]] += area
        return cov

    def __call__(self, files: Sequence[str | Path]) -> torch.Tensor:
        out = []
        for f in files:
            cov = torch.from_numpy(self.coverage(f)).float()
            scores, ids = cov.topk(min(self.top_n, cov.shape[1]), dim=-1)
            keep = scores > 0
            out.append(_pack(ids.masked_fill(~keep, -1), scores.masked_fill(~keep, 0.0)))
        return torch.stack(out)


@lru_cache(maxsize=16)
def _read_scenes(path: str) -> dict:
    return json.loads(Path(path).read_text())


class CLIPLabeller:
    """Eqs. 4-6 with a transformers ``CLIPModel``: patch tokens -> post-LayerNorm -> visual projection
    (CLIP's joint space) against the projected text features of each word, top-n by ``±cos``."""

    def __init__(self, name_or_path: str, words: Sequence[str], grid: int, top_n: int = 10, negate: bool = True,
                 device: torch.device | str = "cpu", batch_size: int = 256, image_mode: str = "released") -> None:
        from transformers import AutoTokenizer, CLIPModel

        path = _locate_clip(name_or_path)
        self.model = CLIPModel.from_pretrained(path).to(device).eval()
        vc = self.model.config.vision_config
        if vc.image_size // vc.patch_size != grid:
            raise LabellerError(
                f"sea.clip_model {name_or_path!r}: its patch grid is {vc.image_size // vc.patch_size}x"
                f"{vc.image_size // vc.patch_size} ({vc.image_size} px / {vc.patch_size}), the backbone's is "
                f"{grid}x{grid}: patch labels would not line up with the backbone's patches")
        self.words, self.top_n, self.negate, self.device = list(words), top_n, negate, device
        self.image_mode = image_mode  # data.image_mode: how the image files are decoded
        self.transform = ImageTransform(vc.image_size)  # the library's transform, not CLIPProcessor's crop
        tokenizer = AutoTokenizer.from_pretrained(path)
        with torch.no_grad():
            feats = []
            for start in range(0, len(self.words), batch_size):
                enc = tokenizer(self.words[start:start + batch_size], padding=True, return_tensors="pt").to(device)
                pooled = self.model.text_model(**enc).pooler_output
                feats.append(self.model.text_projection(pooled))
        self.word_embeds = torch.cat(feats)
        h = hashlib.sha1()
        for name, p in sorted(self.model.state_dict().items()):
            flat = p.detach().flatten().double()
            h.update(f"{name}{tuple(p.shape)}{float(flat.sum()):.8e}{float(flat.abs().sum()):.8e}".encode())
        h.update("\n".join(self.words).encode())
        self.fingerprint = f"clip-{h.hexdigest()[:16]}-n{top_n}-neg{int(negate)}"

    @torch.no_grad()
    def patch_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.model.vision_model
        tokens = vm(pixel_values=pixel_values.to(self.device)).last_hidden_state[:, 1:]
        return self.model.visual_projection(vm.post_layernorm(tokens))

    def __call__(self, files: Sequence[str | Path]) -> torch.Tensor:
        pixels = torch.stack([self.transform(load_image(f, mode=self.image_mode)) for f in files])
        ids, scores = patch_labels(self.patch_embeds(pixels), self.word_embeds, self.top_n, self.negate)
        return _pack(ids, scores).cpu()


def _locate_clip(name_or_path: str) -> Path:
    from sam_mllm.models.backbone import locate_weights

    return locate_weights(name_or_path, what="sea.clip_model", setting="sea.clip_model", error=LabellerError,
                          alternatives="; on the synthetic world, sea.labeller=oracle needs no download")


def build_labeller(sea_cfg, grid: int, device: torch.device | str = "cpu", image_mode: str = "released"):
    """The labeller ``sea_cfg`` (a SEAConfig) names, for a backbone of ``grid x grid`` patches, reading
    images as ``image_mode`` (``data.image_mode``) says."""
    if sea_cfg.labeller == "oracle":
        return OracleLabeller(grid, sea_cfg.top_n, image_mode)
    if sea_cfg.labeller == "clip":
        words = read_word_list(sea_cfg.word_list) if sea_cfg.word_list else world_label_words()
        return CLIPLabeller(sea_cfg.clip_model, words, grid, sea_cfg.top_n, sea_cfg.negate_similarity, device,
                            image_mode=image_mode)
    raise LabellerError(f"sea.labeller={sea_cfg.labeller!r} is not one of {', '.join(LABELLERS)}")


def label_cache(root: str | Path, labeller, transform: ImageTransform) -> FeatureCache:
    """The on-disk cache of one (labeller, transform, image mode): the feature cache's format and keys."""
    return FeatureCache(root, labeller.fingerprint, pixels_fingerprint(transform, labeller.image_mode))


def build_label_cache(root: str | Path, labeller, transform: ImageTransform, files: Sequence[str | Path],
                      batch_size: int = 16) -> tuple[FeatureCache, int]:
    """Label every file not cached yet; returns the cache and how many images were added."""
    cache = label_cache(root, labeller, transform)
    added = cache.build(list(files), lambda chunk: labeller(chunk), batch_size=batch_size, desc="label cache")
    return label_cache(root, labeller, transform), added


def label_precision(ids: torch.Tensor, coverage: torch.Tensor, ks: Sequence[int] = (1, 10),
                    patches: torch.Tensor | None = None) -> dict[str, float]:
    """How often a labeller's patch labels are words the oracle has on that patch.

    ``ids`` [N, P, n]: each patch's label word ids, best first (-1 = no label, as the cached layout);
    ``coverage`` [N, P, V]: the oracle's visible area of each word on each patch (> 0 = present).
    ``precision@k``: of the labels among each patch's first k, the share the oracle has on the patch
    (pooled over all patches); ``labelled``: share of patches with at least one label; ``chance``: the
    precision of a word drawn uniformly from the V words (mean over patches of |present| / V);
    ``ceiling@k``: the best possible precision@k when every patch gets k labels (min(|present|, k) / k).
    ``patches`` [N, P] bool: count only these patches.
    """
    if ids.shape[:2] != coverage.shape[:2]:
        raise ValueError(f"label_precision: labels for {tuple(ids.shape[:2])} (images, patches), "
                         f"oracle coverage for {tuple(coverage.shape[:2])}")
    if patches is not None:
        ids, coverage = ids[patches], coverage[patches]  # [M, n], [M, V]: the same sums over fewer patches
    present = coverage > 0
    n_present = present.sum(-1).double()
    out: dict[str, float] = {"patches": int(present.shape[:-1].numel()),
                             "labelled": float((ids[..., 0] >= 0).double().mean()),
                             "chance": float((n_present / coverage.shape[-1]).mean())}
    for k in ks:
        top = ids[..., :k].long()
        valid = top >= 0
        hit = present.gather(-1, top.clamp_min(0)) & valid
        out[f"precision@{k}"] = float(hit.sum() / valid.sum()) if valid.any() else float("nan")
        out[f"ceiling@{k}"] = float((n_present.clamp(max=k) / k).mean())
    return out


def measure_label_precision(labeller, oracle: OracleLabeller, files: Sequence[str | Path],
                            ks: Sequence[int] = (1, 10), batch_size: int = 32) -> dict[str, dict[str, float]]:
    """:func:`label_precision` of ``labeller`` against ``oracle`` on synthetic-world images ``files``:
    over ``all`` patches, and over ``object`` patches (more object than background: where a labeller
    that only recognised the scene's context would fail)."""
    if list(labeller.words) != list(oracle.words):
        raise LabellerError("label precision: the labeller's word list is not the oracle's (the synthetic world's "
                            f"{len(oracle.words)} words); set sea.word_list=null")
    files = list(files)
    ids = torch.cat([labeller(files[i:i + batch_size])[..., 0].long() for i in range(0, len(files), batch_size)])
    coverage = torch.stack([torch.from_numpy(oracle.coverage(f)) for f in files])
    from sam_mllm.data.synthetic import CONTEXTS

    background = coverage[..., [oracle.index[c] for c in CONTEXTS]].sum(-1)
    return {"all": label_precision(ids, coverage, ks), "object": label_precision(ids, coverage, ks, background < 0.5)}


def saved_patch_grid(folder: str | Path) -> int:
    """The patch grid side of a saved backbone folder, read from its config.json (no weights loaded)."""
    vc = json.loads((Path(folder) / "config.json").read_text())["vision_config"]
    return vc["image_size"] // vc["patch_size"]


def precision_table(clip: str | Path, files: Sequence[str | Path], grid: int, top_n: int = 10) -> str:
    """:func:`measure_label_precision` of a CLIP labeller, with the paper's negated similarity and
    without, over all and over object patches, as a Markdown table."""
    oracle = OracleLabeller(grid, top_n)
    lines = [f"| patches | similarity | labelled | precision@1 | precision@{top_n} | chance | best@{top_n} |",
             "|---|---|---|---|---|---|---|"]
    for negate in (True, False):
        labeller = CLIPLabeller(str(clip), world_label_words(), grid, top_n, negate)
        for part, r in measure_label_precision(labeller, oracle, files, ks=(1, top_n)).items():
            lines.append(f"| {part} ({r['patches']}) | {'-cos (paper)' if negate else '+cos'} | {r['labelled']:.3f} | "
                         f"{r['precision@1']:.3f} | {r[f'precision@{top_n}']:.3f} | {r['chance']:.3f} | "
                         f"{r[f'ceiling@{top_n}']:.3f} |")
    return "\n".join(lines)


def patch_grid(model) -> int:
    """The backbone's patch grid side (224 px / 14 = 16 for EVA-ViT-g)."""
    vc = model.config.vision_config
    return vc.image_size // vc.patch_size

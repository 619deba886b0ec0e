"""Notebook API: ``sam_mllm.load_model(...)`` then ``.generate(images=[...], prompt=...)``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from sam_mllm import hub
from sam_mllm.config import Config, ConfigError, load_config, resolve_config_path
from sam_mllm.data.images import IMAGE_MODES, load_image, to_rgb
from sam_mllm.data.processing import Processor, to_device
from sam_mllm.models import SAMModel, build_model
from sam_mllm.models.checkpoint import ADAPTER_FILE, CONFIG_FILE


class Pipeline:
    """A model with its processor and generation settings; one call per multi-image question.

    ``image_mode``: ``upright`` (default here: phone photos carry their orientation in EXIF)
    applies EXIF orientation, puts transparency on white and scales 16-bit images; ``released``
    (``None``: the config's ``data.image_mode``) feeds the stored pixels, as the benchmark configs do.
    """

    def __init__(self, model: SAMModel, cfg: Config, image_mode: str | None = "upright") -> None:
        self.model = model.eval()
        self.cfg = cfg
        self.image_mode = image_mode or cfg.data.image_mode
        if self.image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode {self.image_mode!r} is not one of {', '.join(IMAGE_MODES)}")
        self.processor = Processor.for_model(model, cfg.model)
        self.generation = dict(vars(cfg.generation))

    @torch.no_grad()
    def generate(self, images: Sequence[Image.Image | str | Path], prompt: str, **generation) -> str:
        """Answer ``prompt`` about ``images`` (PIL images or file paths, in order)."""
        if not images:
            raise ValueError("give at least one image")
        if len(images) > self.model.max_images:
            raise ValueError(f"{len(images)} images given; this model takes at most {self.model.max_images} "
                             "(model.max_images)")
        transform = self.processor.transform(train=False)
        tensors = []
        for i, im in enumerate(images):
            pil = (to_rgb(im, self.image_mode) if isinstance(im, Image.Image)
                   else load_image(im, f"images[{i}]: ", self.image_mode))
            tensors.append(transform(pil))
        item = {"id": 0, "images": torch.stack(tensors), "instruction": prompt, "output": ""}
        batch = to_device(self.processor.collate([item], with_answers=False), self.model.device)
        return self.model.generate(batch, **{**self.generation, **generation})[0]


def load_model(config: str | Path | None = None, checkpoint: str | Path | None = None,
               device: str | torch.device | None = None, overrides: Sequence[str] = (),
               image_mode: str | None = "upright") -> Pipeline:
    """A ready pipeline from a config (name under configs/ or path) and optionally a trained checkpoint.

    ``checkpoint`` is a folder written by training or ``python -m sam_mllm.hub export``
    (``adapter.safetensors`` + ``config.yaml``), a Hugging Face Hub id of such a folder
    (``user/repo``), or an adapter file; given a folder and no ``config``, the folder's own config
    rebuilds the model. A model folder or Hub id may also come first: ``load_model("user/repo")``.
    With neither, the defaults describe SAM on InstructBLIP-Vicuna-7B; ``load_model("demo/sam")``
    is the embedded tiny model (a shipped config name wins over a Hub id of the same spelling).
    ``image_mode``: see :class:`Pipeline` (``None``: the config's).
    """
    if config is not None and checkpoint is None and _names_a_model(str(config)):
        config, checkpoint = None, config
    ckpt = hub.locate(checkpoint) if checkpoint is not None else None
    if config is None and ckpt is not None and (ckpt / CONFIG_FILE).is_file():
        config = ckpt / CONFIG_FILE
    extra = list(overrides)
    if ckpt is not None:
        extra.append(f"model.checkpoint={ckpt / ADAPTER_FILE if ckpt.is_dir() else ckpt}")
    cfg = load_config(config, extra)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model).to(device)
    return Pipeline(model, cfg, image_mode)


def _names_a_model(name: str) -> bool:
    """A model folder, or a Hub id that is not also the name of a shipped config."""
    if hub.is_model_folder(name):
        return True
    if not hub.looks_like_hub_id(name):
        return False
    try:
        resolve_config_path(name)
    except ConfigError:
        return True
    return False

"""Images and text to model batches: InstructBLIP's transforms, tokenisation, padded collation.

Evaluation uses InstructBLIP's transform (square bicubic resize, CLIP mean/std). Training adds a
random-resized crop (scale 0.5-1) but, unlike LAVIS, no horizontal flip by default: left and right
carry meaning in change captioning and stories. Random draws come from a generator seeded per
(seed, epoch, sample index), so a resumed run sees exactly the crops it would have seen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sam_mllm.data.images import ImageLoadError, load_image  # noqa: F401 (the one loader, re-exported)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageTransform:
    """Resize (eval) or random-resized-crop (train) to a square, then CLIP normalisation."""

    image_size: int
    train: bool = False
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = False

    @property
    def deterministic(self) -> bool:
        return not self.train

    @property
    def fingerprint(self) -> str:
        """Identifies the transform's output, for feature-cache keys."""
        if self.train:
            return f"rrc{self.image_size}-s{self.crop_scale[0]}-{self.crop_scale[1]}-f{int(self.hflip)}-clip"
        return f"resize{self.image_size}-bicubic-clip"

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> Tensor:
        image = image.convert("RGB")
        if self.train:
            rng = rng or random.Random()
            left, top, w, h = _random_crop_box(image.width, image.height, self.crop_scale, rng)
            image = image.resize((self.image_size, self.image_size), Image.BICUBIC, box=(left, top, left + w, top + h))
            if self.hflip and rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)
        mean = torch.tensor(CLIP_MEAN)[:, None, None]
        std = torch.tensor(CLIP_STD)[:, None, None]
        return (tensor - mean) / std


def _random_crop_box(width: int, height: int, scale: tuple[float, float], rng: random.Random,
                     ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """The usual random-resized-crop box: area fraction in ``scale``, aspect ratio log-uniform."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # Fall back to the largest centred crop of an allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class Processor:
    """Tokenises prompts and answers and collates samples into the batch the model takes."""

    def __init__(self, qformer_tokenizer, llm_tokenizer, image_size: int, max_prompt_tokens: int = 128,
                 max_answer_tokens: int = 256, max_qformer_tokens: int = 128,
                 image_placement: str = "prefix") -> None:
        from sam_mllm.data.placement import PLACEMENTS

        if image_placement not in PLACEMENTS:
            raise ValueError(f"image_placement={image_placement!r} is not one of {', '.join(PLACEMENTS)}")
        self.image_placement = image_placement  # sam_mllm.data.placement
        self.qformer_tokenizer = qformer_tokenizer
        self.llm_tokenizer = llm_tokenizer
        self.image_size = image_size
        self.max_prompt_tokens = max_prompt_tokens
        self.max_answer_tokens = max_answer_tokens
        self.max_qformer_tokens = max_qformer_tokens

    @classmethod
    def for_model(cls, model, cfg=None) -> Processor:
        """``cfg``: a ModelConfig for the token budgets (LAVIS's 128 / 256 / 128 otherwise)."""
        if model.llm_tokenizer is None or model.qformer_tokenizer is None:
            raise ValueError("the model has no tokenizers (was it built on the meta device?)")
        budgets = {} if cfg is None else dict(
            max_prompt_tokens=cfg.max_prompt_tokens, max_answer_tokens=cfg.max_answer_tokens,
            max_qformer_tokens=cfg.max_qformer_tokens, image_placement=cfg.image_placement)
        return cls(model.qformer_tokenizer, model.llm_tokenizer, model.config.vision_config.image_size, **budgets)

    def transform(self, train: bool = False, crop_scale: Sequence[float] = (0.5, 1.0),
                  hflip: bool = False) -> ImageTransform:
        return ImageTransform(self.image_size, train, (float(crop_scale[0]), float(crop_scale[1])), hflip)

    def tokenize_prompt(self, instruction: str) -> list[int]:
        ids = self.llm_tokenizer(instruction).input_ids
        if len(ids) > self.max_prompt_tokens:
            # LAVIS truncates prompts from the left (the question is at the end); BOS stays first.
            bos = self.llm_tokenizer.bos_token_id
            head = ids[:1] if bos is not None and ids[0] == bos else []
            ids = head + ids[len(ids) - (self.max_prompt_tokens - len(head)):]
        return ids

    def tokenize_answer(self, answer: str) -> list[int]:
        ids = self.llm_tokenizer(answer, add_special_tokens=False).input_ids
        return ids[: self.max_answer_tokens - 1] + [self.llm_tokenizer.eos_token_id]

    def collate(self, items: Sequence[dict], with_answers: bool) -> dict:
        """Items with ``images`` ([n, 3, S, S]) or ``image_embeds`` ([n, P, Dv]), ``instruction``,
        ``output`` and ``id`` -> a padded batch (image axis padded, ``image_mask`` marks real images)."""
        b = len(items)
        key = "image_embeds" if "image_embeds" in items[0] else "images"
        n_max = max(len(it[key]) for it in items)
        first = items[0][key]
        visual = first.new_zeros((b, n_max, *first.shape[1:]))
        image_mask = torch.zeros(b, n_max, dtype=torch.bool)
        for i, it in enumerate(items):
            n = len(it[key])
            visual[i, :n] = it[key]
            image_mask[i, :n] = True

        markers = self.image_placement == "markers"
        if markers:
            from sam_mllm.data.placement import strip_markers, tokenize_at_markers
        qf = self.qformer_tokenizer(
            [strip_markers(it["instruction"]) if markers else it["instruction"] for it in items],
            padding="longest", truncation=True, max_length=self.max_qformer_tokens, return_tensors="pt",
        )
        rows, label_rows, slot_rows = [], [], []
        for it in items:
            if markers:
                prompt, slots = tokenize_at_markers(self.llm_tokenizer, it["instruction"], len(it[key]), it["id"],
                                                    self.max_prompt_tokens)
                slot_rows.append(slots)
            else:
                prompt = self.tokenize_prompt(it["instruction"])
            answer = self.tokenize_answer(it["output"]) if with_answers else []
            rows.append(prompt + answer)
            label_rows.append([-100] * len(prompt) + answer)
        width = max(map(len, rows))
        pad = self.llm_tokenizer.pad_token_id
        input_ids = torch.full((b, width), pad if pad is not None else 0, dtype=torch.long)
        attention_mask = torch.zeros(b, width, dtype=torch.long)
        labels = torch.full((b, width), -100, dtype=torch.long)
        for i, (row, lab) in enumerate(zip(rows, label_rows)):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
            labels[i, : len(lab)] = torch.tensor(lab)
        batch = {
            "ids": [it["id"] for it in items],
            "image_mask": image_mask,
            "qformer_input_ids": qf.input_ids,
            "qformer_attention_mask": qf.attention_mask,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
        }
        batch["image_embeds" if key == "image_embeds" else "pixel_values"] = visual
        if markers:  # image k's visual tokens go where slot == k (sam_mllm.models.placement)
            batch["image_slots"] = torch.full((b, width), -1, dtype=torch.long)
            for i, slots in enumerate(slot_rows):
                batch["image_slots"][i, : len(slots)] = torch.tensor(slots)
        if with_answers:
            batch["labels"] = labels
        return batch


def to_device(batch: dict, device: torch.device | str) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}

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
from sam_mllm.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PromptTooLongError(UserError, ValueError):
    """An evaluation prompt that does not fit the LLM's context; names the sample."""


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
                 image_placement: str = "prefix", llm_bos: str | None = "</s>",
                 llm_context: int | None = None, visual_tokens_per_image: int = 0,
                 truncate_eval_prompts: bool = False) -> None:
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
        # LAVIS builds its Q-Former tokenizer with truncation_side="left"; tokenizer files may say
        # otherwise (the embedded backbone's cut from the right), so it is set here, not inherited.
        qformer_tokenizer.truncation_side = "left"
        self.llm_bos_id = resolve_bos(llm_tokenizer, llm_bos)
        self.llm_context = llm_context
        self.visual_tokens_per_image = visual_tokens_per_image
        self.truncate_eval_prompts = truncate_eval_prompts

    @classmethod
    def for_model(cls, model, cfg=None) -> Processor:
        """``cfg``: a ModelConfig for the token budgets and the BOS (LAVIS's 128 / 256 / 128 and the
        released ``</s>`` otherwise)."""
        if model.llm_tokenizer is None or model.qformer_tokenizer is None:
            raise ValueError("the model has no tokenizers (was it built on the meta device?)")
        options = {} if cfg is None else dict(
            max_prompt_tokens=cfg.max_prompt_tokens, max_answer_tokens=cfg.max_answer_tokens,
            max_qformer_tokens=cfg.max_qformer_tokens, image_placement=cfg.image_placement,
            llm_bos=cfg.llm_bos, truncate_eval_prompts=cfg.truncate_eval_prompts)
        vision = model.config.vision_config
        per_image = ((vision.image_size // vision.patch_size) ** 2 if getattr(model, "perceiver", "qformer") == "mlp"
                     else model.num_query_tokens)
        return cls(model.qformer_tokenizer, model.llm_tokenizer, vision.image_size,
                   llm_context=getattr(model.config.text_config, "max_position_embeddings", None),
                   visual_tokens_per_image=per_image, **options)

    def transform(self, train: bool = False, crop_scale: Sequence[float] = (0.5, 1.0),
                  hflip: bool = False) -> ImageTransform:
        return ImageTransform(self.image_size, train, (float(crop_scale[0]), float(crop_scale[1])), hflip)

    def tokenize_prompt(self, instruction: str, truncate: bool = True) -> list[int]:
        """LLM prompt ids: the configured BOS, then the instruction; ``truncate`` cuts the instruction
        from the left (as LAVIS's training did: the question is at the end) so that BOS + instruction
        fit ``max_prompt_tokens``. The BOS is never cut."""
        if self.llm_bos_id is None:  # llm_bos: null -- the tokenizer's own template, as it is
            ids = self.llm_tokenizer(instruction).input_ids
            bos = self.llm_tokenizer.bos_token_id
            head = ids[:1] if ids and bos is not None and ids[0] == bos else []
            body = ids[len(head):]
        else:
            head = [self.llm_bos_id]
            body = self.llm_tokenizer(instruction, add_special_tokens=False).input_ids
        if truncate and len(head) + len(body) > self.max_prompt_tokens:
            body = body[len(body) - (self.max_prompt_tokens - len(head)):]
        return head + body

    def is_truncated(self, instruction: str) -> bool:
        """Whether a training prompt is cut (its LLM tokens exceed ``max_prompt_tokens``)."""
        return len(self.tokenize_prompt(instruction, truncate=False)) > self.max_prompt_tokens

    def tokenize_answer(self, answer: str) -> list[int]:
        # The released tokenizer saw ``answer + "</s>"`` and stripped the whitespace before the
        # special token, so a trailing space or newline adds no token before EOS.
        ids = self.llm_tokenizer(answer.rstrip(), add_special_tokens=False).input_ids
        return ids[: self.max_answer_tokens - 1] + [self.llm_tokenizer.eos_token_id]

    def _eval_prompt(self, item: dict, num_images: int) -> list[int]:
        """Evaluation prompts are not truncated (the released ``generate`` passed the whole prompt),
        unless ``truncate_eval_prompts``; one that cannot fit the LLM's context is an error."""
        if self.truncate_eval_prompts:
            return self.tokenize_prompt(item["instruction"])
        ids = self.tokenize_prompt(item["instruction"], truncate=False)
        visual = num_images * self.visual_tokens_per_image
        if self.llm_context is not None and visual + len(ids) > self.llm_context:
            raise PromptTooLongError(
                f"sample id {item.get('id')!r}: its prompt is {len(ids)} LLM tokens, which with {visual} visual "
                f"tokens exceeds the LLM's context of {self.llm_context}; shorten it, or set "
                f"model.truncate_eval_prompts=true to cut it from the left to {self.max_prompt_tokens} tokens "
                "as training does")
        return ids

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
                prompt = (self.tokenize_prompt(it["instruction"]) if with_answers
                          else self._eval_prompt(it, len(it[key])))
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


def resolve_bos(tokenizer, token: str | None) -> int | None:
    """The id of the configured LLM BOS token, checked against the tokenizer; None for ``null``."""
    if token is None:
        return None
    ids = tokenizer.convert_tokens_to_ids([token])
    known = token in tokenizer.get_vocab() or token in tokenizer.all_special_tokens
    if not ids or ids[0] is None or not known:
        raise ValueError(f"model.llm_bos={token!r} is not a token of the LLM tokenizer "
                         f"(its BOS is {tokenizer.bos_token!r}, its EOS {tokenizer.eos_token!r})")
    return int(ids[0])


def to_device(batch: dict, device: torch.device | str) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from sam_mllm.models.backbone import build_from_dims
from sam_mllm.models.sam import SAMModel
from sam_mllm.models.tokenizers import build_word_tokenizers

WORDS = "a the red blue green star circle square is in on what image images shared object ? . , :".split()


@pytest.fixture(scope="session")
def tokenizers():
    return build_word_tokenizers(WORDS)


@pytest.fixture(scope="session")
def tiny_backbone():
    torch.manual_seed(0)
    return build_from_dims("tiny", "eager").eval()


def make_model(backbone, tokenizers, **options) -> SAMModel:
    """A SAM / InstructBLIP model on a private copy of one shared random backbone."""
    llm, qf = tokenizers
    return SAMModel(copy.deepcopy(backbone), qf, llm, **options).eval()


def make_batch(tokenizers, num_images: list[int], image_size: int = 32, seed: int = 0,
               prompts: list[str] | None = None, answers: list[str] | None = None) -> dict:
    """Random pixels, a padded image axis, and prompt/answer tokens laid out like the collator's."""
    llm, qf = tokenizers
    g = torch.Generator().manual_seed(seed)
    b, n = len(num_images), max(num_images)
    pixel_values = torch.randn(b, n, 3, image_size, image_size, generator=g)
    image_mask = torch.zeros(b, n, dtype=torch.bool)
    for i, k in enumerate(num_images):
        image_mask[i, :k] = True
    pixel_values = pixel_values * image_mask[:, :, None, None, None]
    prompts = prompts or [["what is the shared object ?", "what is in the image ?", "a red star ?"][i % 3]
                          for i in range(b)]
    answers = answers or [["a red star .", "the blue circle .", "a green square is in the image ."][i % 3]
                          for i in range(b)]
    q = qf(prompts, padding=True, return_tensors="pt")
    ids, labels = [], []
    for p, a in zip(prompts, answers):
        p_ids = llm(p).input_ids
        a_ids = llm(a, add_special_tokens=False).input_ids + [llm.eos_token_id]
        ids.append(p_ids + a_ids)
        labels.append([-100] * len(p_ids) + a_ids)
    width = max(map(len, ids))
    input_ids = torch.full((b, width), llm.pad_token_id)
    attention_mask = torch.zeros(b, width, dtype=torch.long)
    label_t = torch.full((b, width), -100)
    for i, (x, y) in enumerate(zip(ids, labels)):
        input_ids[i, : len(x)] = torch.tensor(x)
        attention_mask[i, : len(x)] = 1
        label_t[i, : len(y)] = torch.tensor(y)
    return dict(pixel_values=pixel_values, image_mask=image_mask, qformer_input_ids=q.input_ids,
                qformer_attention_mask=q.attention_mask, input_ids=input_ids, attention_mask=attention_mask,
                labels=label_t)


def select(batch: dict, i: int) -> dict:
    """Sample ``i`` alone, with its own padding trimmed (as if it had been collated alone)."""
    out = {k: v[i : i + 1] for k, v in batch.items()}
    n = int(out["image_mask"].sum())
    out["pixel_values"], out["image_mask"] = out["pixel_values"][:, :n], out["image_mask"][:, :n]
    t = int(out["attention_mask"].sum())
    for k in ("input_ids", "attention_mask", "labels"):
        out[k] = out[k][:, :t]
    tq = int(out["qformer_attention_mask"].sum())
    out["qformer_input_ids"] = out["qformer_input_ids"][:, :tq]
    out["qformer_attention_mask"] = out["qformer_attention_mask"][:, :tq]
    return out


def write_dataset(root, n: int = 8, seed: int = 0, image_size: int = 32, max_images: int = 3) -> list[dict]:
    """A small dataset in the sample schema: coloured PNGs and word-level instructions/answers."""
    import json
    import random
    from pathlib import Path

    import numpy as np
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    samples = []
    for i in range(n):
        k = 1 + i % max_images
        name = rng.choice(list(colours))
        imgs = []
        for j in range(k):
            arr = np.random.default_rng(seed * 1000 + i * 10 + j).integers(0, 60, (image_size, image_size, 3))
            arr[8:24, 8:24] = colours[name]
            path = f"images/s{i}_{j}.png"
            Image.fromarray(arr.astype(np.uint8)).save(root / path)
            imgs.append(path)
        samples.append({"id": i, "img_list": imgs, "instruction": "what is the shared object ?",
                        "output": f"a {name} square ."})
    (root / "annotations.json").write_text(json.dumps(samples, indent=1))
    return samples


def train_overrides(data: Path, out: Path, extra: list[str] = (), *, warmup: int = 2, batch: int = 4,
                    save_every: int = 3) -> list[str]:
    """Overrides of a tiny-model training run on the dataset ``write_dataset`` wrote at ``data``."""
    return ["model.dims=tiny", f"data_root={data.parent}", f"output_dir={out}",
            f"train.datasets=[{{name: tiny, task: group_captioning, path: {data.name}}}]",
            "train.lr=1e-3", f"train.warmup_steps={warmup}", f"train.global_batch_size={batch}",
            "train.micro_batch_size=2", "train.log_every=1", f"train.save_every={save_every}", *extra]

"""Pre-train the embedded tiny CLIP (sam_mllm/assets/tiny_clip), SEA's CLIP labeller on the synthetic world.

    OMP_NUM_THREADS=1 python scripts/pretrain_tiny_clip.py [--out sam_mllm/assets/tiny_clip] [--steps N]

A transformers ``CLIPModel`` built from a small ``CLIPConfig`` (nothing downloaded) whose vision
tower has the committed tiny backbone's patch grid (image and patch size read from
sam_mllm/assets/tiny_backbone/config.json), and a word-level tokenizer over the world's closed
vocabulary (``<|startoftext|> words <|endoftext|>``; CLIP pools at ``<|endoftext|>``).

Training data: the synthetic world's single-image ``pretrain`` split (generated with ``--seed``),
each image's text drawn per step from what its recorded scene (scenes.json) says: the whole caption
("a red striped circle and a blue star on the grass."), one object's name ("red striped circle") or
one word of the image (a colour, shape, pattern or the context), so single words, which SEA's
labeller embeds, land in the joint space. Loss: CLIP's symmetric image-text contrastive loss with
a learnable logit scale; a text that also describes another image of the batch (the same word, the
same object) counts that image as a positive too, instead of as a false negative.

At the end the held-out ``pretrain/test`` images measure the labeller's patch-label precision
against the oracle (scripts/label_precision.py does the same for any CLIP folder).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sam_mllm.data.synthetic import CONTEXTS, SCENES_FILE, generate, object_name, vocabulary
from sam_mllm.models.backbone import TINY_BACKBONE
from sam_mllm.models.tokenizers import build_clip_word_tokenizer


def ensure_world(data: Path, seed: int, n_train: int, n_test: int) -> Path:
    """The ``pretrain`` split with ``n_train`` training and ``n_test`` held-out images (reused if there)."""
    manifest = data / "manifest.json"
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        if found.get("seed") == seed and found["counts"].get("pretrain") == {"train": n_train, "test": n_test}:
            return data / "pretrain"
    generate(data, seed=seed, datasets=["pretrain"], sizes={"pretrain": {"train": n_train, "val": 0, "test": n_test}})
    return data / "pretrain"


def scene_texts(scene: dict) -> tuple[str, list[str], list[str]]:
    """(caption, object names, words) of one recorded scene, in the world's own phrasing."""
    objs = sorted(scene["objects"], key=lambda p: p["x"])
    names = [object_name(*p["obj"]) for p in objs]
    listing = f"a {names[0]}" if len(names) == 1 else ", ".join(f"a {n}" for n in names[:-1]) + f" and a {names[-1]}"
    words = {scene["context"]}
    for p in objs:
        shape, colour, pattern = p["obj"]
        words |= {shape, colour} | ({pattern} if pattern != "plain" else set())
    return f"{listing} {CONTEXTS[scene['context']]}.", names, sorted(words)


def load_split(folder: Path, image_size: int) -> tuple[torch.Tensor, list[tuple[str, list[str], list[str]]]]:
    """Pixels (the library's transform, as the labeller sees them) and scene texts of a split."""
    from sam_mllm.data.processing import ImageTransform, load_image

    scenes = json.loads((folder / SCENES_FILE).read_text())["scenes"]
    transform = ImageTransform(image_size)
    files = sorted(scenes)
    pixels = torch.stack([transform(load_image(folder / f)) for f in tqdm(files, desc=f"load {folder.name}")])
    return pixels, [scene_texts(scenes[f]) for f in files]


def draw_texts(batch: list[tuple[str, list[str], list[str]]], rng: np.random.Generator) -> tuple[list[str], torch.Tensor]:
    """One text per image (caption 1/2, object name 1/4, word 1/4) and which images each text describes."""
    texts, kinds = [], []
    for caption, names, words in batch:
        u = rng.random()
        if u < 0.5:
            kind, text = "caption", caption
        elif u < 0.75:
            kind, text = "object", names[rng.integers(len(names))]
        else:
            kind, text = "word", words[rng.integers(len(words))]
        texts.append(text)
        kinds.append(kind)
    match = torch.zeros(len(batch), len(batch), dtype=torch.bool)  # [text, image]
    for t, (text, kind) in enumerate(zip(texts, kinds)):
        for j, (caption, names, words) in enumerate(batch):
            match[t, j] = text == caption if kind == "caption" else text in (names if kind == "object" else words)
    return texts, match


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                     match: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over cosine logits; targets spread evenly over every match."""
    logits = logit_scale.exp() * F.normalize(text_embeds, dim=-1) @ F.normalize(image_embeds, dim=-1).T
    m = match.float()
    text_to_image = -(m / m.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    image_to_text = -(m.T / m.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return (text_to_image + image_to_text) / 2


def build_model(tokenizer, image_size: int, patch_size: int, width: int, vision_layers: int, text_layers: int):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=text_layers, num_attention_heads=4, max_position_embeddings=32,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=vision_layers,
                           num_attention_heads=4, image_size=image_size, patch_size=patch_size),
        projection_dim=width)
    return CLIPModel(cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="sam_mllm/assets/tiny_clip")
    p.add_argument("--data", default="runs/tiny_clip/data", help="where the synthetic pretrain split is generated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=6000)
    p.add_argument("--test-images", type=int, default=100)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--text-layers", type=int, default=2)
    args = p.parse_args()
    start = time.monotonic()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    backbone = json.loads((TINY_BACKBONE / "config.json").read_text())["vision_config"]
    image_size, patch_size = backbone["image_size"], backbone["patch_size"]
    world = ensure_world(Path(args.data), args.seed, args.train_images, args.test_images)
    pixels, scenes = load_split(world / "train", image_size)
    tokenizer = build_clip_word_tokenizer(vocabulary())
    model = build_model(tokenizer, image_size, patch_size, args.width, args.vision_layers, args.text_layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    model.train()
    bar = tqdm(range(args.steps), desc="tiny clip", unit="step")
    for step in bar:
        idx = torch.from_numpy(rng.choice(len(scenes), args.batch_size, replace=False))
        texts, match = draw_texts([scenes[i] for i in idx.tolist()], rng)
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels[idx])
        loss = contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale, match)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the logit scale
        if step % 20 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    train_s = time.monotonic() - start

    out = Path(args.out)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"saved {out} ({size / 2**20:.2f} MiB, {sum(p.numel() for p in model.parameters())} parameters); "
          f"data + training took {train_s:.0f} s")

    from sam_mllm.objectives.labellers import precision_table

    files = sorted((world / "test" / "images").glob("*.png"))
    print(f"patch-label precision on held-out pretrain/test ({len(files)} images):")
    print(precision_table(out, files, image_size // patch_size))
    print(f"total {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()

"""Tiny random stand-ins for every model of the MmLINK pipeline, built from the libraries' own classes
and saved as local folders (so the real loading code runs): an SD-inpainting pipeline (diffusers),
Segment Anything, a LLaMA and CLIP (transformers). For the tests and the cost measurement
(scripts/mmlink_cost.py); the describer uses the repo's tiny backbone (``describer.config=demo/sam``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from sam_mllm.data import synthetic
from sam_mllm.models.backbone import TINY_BACKBONE


def clip_tokenizer(folder: Path):
    """A real ``CLIPTokenizer`` over a character-level vocabulary (no merges)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def build_tiny_components(root: str | Path, seed: int = 0) -> Path:
    """Writes ``root/{sd,sam,llm,clip}``; returns ``root``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import (
        AutoTokenizer,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        LlamaConfig,
        LlamaForCausalLM,
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    root = Path(root)
    torch.manual_seed(seed)
    tok = clip_tokenizer(root / "clip_tokenizer")
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, projection_dim=16)
    # 9 input channels: noisy latents, the mask and the masked image's latents (SD inpainting's layout)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=9,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=4, sample_size=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionInpaintPipeline(vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(root / "sd")
    sam = SamModel(SamConfig(
        vision_config=SamVisionConfig(hidden_size=16, output_channels=8, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=64, patch_size=16, mlp_dim=32, window_size=2,
                                      global_attn_indexes=[1], num_pos_feats=4),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=8, image_size=64, patch_size=16,
                                                     mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                                 mlp_dim=16, iou_head_hidden_dim=8)))
    sam.save_pretrained(root / "sam")
    SamProcessor(SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                   mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16})
                 ).save_pretrained(root / "sam")
    llm_tok = AutoTokenizer.from_pretrained(TINY_BACKBONE)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(llm_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                 bos_token_id=llm_tok.bos_token_id, eos_token_id=llm_tok.eos_token_id,
                                 pad_token_id=llm_tok.pad_token_id)).save_pretrained(root / "llm")
    llm_tok.save_pretrained(root / "llm")
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
              ).save_pretrained(root / "clip")
    CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tok).save_pretrained(root / "clip")
    return root


def identity_folders(root: str | Path) -> Path:
    """Four identities (synthetic objects photographed on plain backgrounds), 2-3 RGB images each; the
    first has a ``description.txt``."""
    root = Path(root)
    for j, obj in enumerate([("star", "red", "plain"), ("circle", "blue", "striped"), ("square", "green", "dotted"),
                             ("heart", "yellow", "checkered")]):
        folder = root / "_".join(obj)
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(2 + j % 2):
            sprite = synthetic.render_object(*obj, 40, 15.0 * k - 10)
            photo = Image.new("RGBA", (48, 56), (230 - 20 * k, 225, 215, 255))
            photo.alpha_composite(sprite, (4, 8))
            photo.convert("RGB").save(folder / f"{k}.jpg", quality=95)
    (root / "star_red_plain" / "description.txt").write_text("a red star")
    return root

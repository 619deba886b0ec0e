"""Model-backed stages: Segment Anything (transformers ``SamModel``; not this library's SAM),
an instruction LLM (transformers, or an OpenAI-compatible endpoint) writing backgrounds and refining
descriptions, Stable Diffusion inpainting (diffusers, the ``mmlink`` extra), this library's own
InstructBLIP as the describer, and CLIP for the optional QC score.

Weights are a Hugging Face id (taken from the local cache; downloaded only when the hub is reachable
and HF_HUB_OFFLINE is unset) or a local folder; missing weights raise :class:`MissingWeightsError`
saying how to provide them.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sam_mllm.data.mmlink.stages import PLACES, Background, Composition, Item, ObjectGroup, PipelineError
from sam_mllm.models.backbone import BackboneNotFoundError, locate_weights
from sam_mllm.registry import register

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class MissingWeightsError(BackboneNotFoundError):
    """A stage's weights are not on this machine and cannot be downloaded."""


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise PipelineError(f"dtype={dtype!r}; choose from {', '.join(DTYPES)}")
    return torch.float32 if device == "cpu" and dtype == "float16" else DTYPES[dtype]


def locate(name_or_path: str, stage: str, marker: str = "config.json") -> Path:
    """A stage's weights: a local folder, or the cached (or, online, downloaded) snapshot of a hub id."""
    setting = stage if "." in stage else f"{stage}.model"
    return locate_weights(name_or_path, what=stage, setting=setting, error=MissingWeightsError,
                          marker=marker)
def _on_white(image: Image.Image) -> Image.Image:
    if image.mode != "RGBA":
        return image.convert("RGB")
    out = Image.new("RGBA", image.size, (255, 255, 255, 255))
    out.alpha_composite(image)
    return out.convert("RGB")


# ----------------------------------------------------------------------------------- Segment Anything

@register("mmlink_segmenter", "segment_anything")
class SegmentAnythingSegmenter:
    """Segment Anything (Kirillov et al. 2023) through transformers' ``SamModel``: one box prompt
    covering the image inset by ``box_margin`` (``prompt: box``) or one point at the centre
    (``prompt: point``); of the three masks it proposes, the one with the highest predicted IoU."""

    def __init__(self, model: str = "facebook/sam-vit-huge", prompt: str = "box", box_margin: float = 0.02,
                 mask_threshold: float = 0.0, device: str = "auto", dtype: str = "float32") -> None:
        from transformers import SamModel, SamProcessor

        if prompt not in ("box", "point"):
            raise PipelineError(f"segmenter.prompt={prompt!r}; choose from box, point")
        path = locate(model, "segmenter")
        self.device = resolve_device(device)
        self.model = SamModel.from_pretrained(path, dtype=resolve_dtype(dtype, self.device)).to(self.device).eval()
        self.processor = SamProcessor.from_pretrained(path)
        self.model_id, self.prompt, self.margin, self.threshold = model, prompt, float(box_margin), mask_threshold

    @torch.no_grad()
    def segment(self, image: Image.Image) -> np.ndarray:
        rgb = _on_white(image)
        w, h = rgb.size
        if self.prompt == "box":
            m = self.margin
            prompt = {"input_boxes": [[[m * w, m * h, (1 - m) * w, (1 - m) * h]]]}
        else:
            prompt = {"input_points": [[[[w / 2, h / 2]]]]}
        inputs = self.processor(images=rgb, return_tensors="pt", **prompt)
        sizes = {k: inputs.pop(k) for k in ("original_sizes", "reshaped_input_sizes")}
        inputs = {k: v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device)
                  for k, v in inputs.items()}
        out = self.model(**inputs, multimask_output=True)
        masks = self.processor.image_processor.post_process_masks(
            out.pred_masks.float().cpu(), sizes["original_sizes"], sizes["reshaped_input_sizes"],
            mask_threshold=self.threshold)[0][0]  # (3, H, W) for the one prompt
        best = int(out.iou_scores[0, 0].float().argmax())
        return masks[best].numpy().astype(bool)


# ------------------------------------------------------------------------------------ instruction LLM

@lru_cache(maxsize=2)
def load_causal_lm(model: str, device: str, dtype: str) -> tuple[Any, Any]:
    """(model, tokenizer), shared by the writer and the refiner when they name the same LLM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = locate(model, "writer/refiner")
    device = resolve_device(device)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device)).to(device).eval()
    return lm, AutoTokenizer.from_pretrained(path)


class _LocalLLM:
    """Sampled text from a local causal LM; the sampling seed is the sample's, so reruns repeat."""

    def __init__(self, model: str, max_new_tokens: int, temperature: float, top_p: float, device: str,
                 dtype: str) -> None:
        self.model_id, self.device_name, self.dtype = model, resolve_device(device), dtype
        self.max_new_tokens, self.temperature, self.top_p = int(max_new_tokens), float(temperature), float(top_p)
        self.lm, self.tokenizer = load_causal_lm(model, self.device_name, dtype)

    @torch.no_grad()
    def complete(self, prompt: str, seed: int) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
        else:
            text = prompt
        inputs = tok(text, return_tensors="pt").to(self.lm.device)
        devices = [torch.cuda.current_device()] if self.lm.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.lm.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0,
                                   temperature=self.temperature or None, top_p=self.top_p,
                                   pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        return _first_line(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        line = line.strip().strip('"').strip()
        if line:
            return line
    return ""


class _EndpointLLM:
    """An OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp server, OpenAI, ...)."""

    def __init__(self, model: str, base_url: str, api_key_env: str, max_new_tokens: int, temperature: float,
                 top_p: float, transport: Any = None) -> None:
        import httpx

        self.model_id = f"{base_url.rstrip('/')}#{model}"
        self.model, self.max_new_tokens, self.temperature, self.top_p = model, max_new_tokens, temperature, top_p
        key = os.environ.get(api_key_env, "")
        self.client = httpx.Client(base_url=base_url.rstrip("/"), timeout=120, transport=transport,
                                   headers={"Authorization": f"Bearer {key}"} if key else {})

    def complete(self, prompt: str, seed: int) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "seed": int(seed % 2**31),
                "max_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p}
        resp = self.client.post("/chat/completions", json=body)
        if resp.status_code != 200:
            raise PipelineError(f"endpoint {self.model_id}: HTTP {resp.status_code}: {resp.text[:200]}")
        return _first_line(resp.json()["choices"][0]["message"]["content"])


def _llm(model: str, endpoint: str | None, api_key_env: str, max_new_tokens: int, temperature: float,
         top_p: float, device: str, dtype: str) -> Any:
    if endpoint:
        return _EndpointLLM(model, endpoint, api_key_env, max_new_tokens, temperature, top_p)
    return _LocalLLM(model, max_new_tokens, temperature, top_p, device, dtype)


WRITER_PROMPT = ("Write one short description (at most 25 words) of a background scene for a photo of "
                 "{subject}, set in {place}. Describe only the scene, not the people. Answer with the "
                 "description alone.")
REFINER_PROMPT = ("Here is a description of the main person in a photo: \"{description}\". Rewrite it as one "
                  "fluent, factual sentence about the person's appearance and clothing. Answer with the "
                  "sentence alone.")


@register("mmlink_writer", "llm")
class LLMWriter:
    """Background descriptions from an instruction LLM (the paper used ChatGPT): one sampled
    completion per image, each prompted with a different place so the two backgrounds differ.
    ``endpoint`` (an OpenAI-compatible base URL) replaces the local model."""

    def __init__(self, model: str = "Qwen/Qwen2.5-7B-Instruct", prompt: str = WRITER_PROMPT,
                 places: list[str] | None = None, endpoint: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 max_new_tokens: int = 60, temperature: float = 1.0, top_p: float = 0.95,
                 device: str = "auto", dtype: str = "bfloat16") -> None:
        self.llm = _llm(model, endpoint, api_key_env, max_new_tokens, temperature, top_p, device, dtype)
        self.model_id, self.prompt, self.places = self.llm.model_id, prompt, list(places or PLACES)

    def write(self, group: ObjectGroup, count: int, rng: np.random.Generator, seed: int) -> list[Background]:
        subject = group.main[0].name or "a person"
        places = rng.choice(len(self.places), count, replace=count > len(self.places))
        return [Background(self.llm.complete(self.prompt.format(subject=subject, place=self.places[int(p)]),
                                             seed + k)) for k, p in enumerate(places)]


@register("mmlink_refiner", "llm")
class LLMRefiner:
    """The describer's text rewritten by an instruction LLM into the answer (the paper used ChatGPT)."""

    def __init__(self, model: str = "Qwen/Qwen2.5-7B-Instruct", prompt: str = REFINER_PROMPT,
                 endpoint: str | None = None, api_key_env: str = "OPENAI_API_KEY", max_new_tokens: int = 80,
                 temperature: float = 0.7, top_p: float = 0.95, device: str = "auto", dtype: str = "bfloat16") -> None:
        if "{description}" not in prompt:
            raise PipelineError("refiner.prompt must contain {description}")
        self.llm = _llm(model, endpoint, api_key_env, max_new_tokens, temperature, top_p, device, dtype)
        self.model_id, self.prompt = self.llm.model_id, prompt

    def refine(self, description: str, seed: int) -> str:
        return self.llm.complete(self.prompt.format(description=description), seed)


# ----------------------------------------------------------------------------------------- inpainter

def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise PipelineError("the stable_diffusion inpainter needs diffusers: pip install -e \".[mmlink]\" "
                            "(the mmlink extra)") from None
    return diffusers


@register("mmlink_inpainter", "stable_diffusion")
class StableDiffusionInpainter:
    """diffusers' ``StableDiffusionInpaintPipeline`` fills everything the objects do not fully cover;
    the pipeline pastes the objects back afterwards, so their pixels are the source's."""

    def __init__(self, model: str = "stable-diffusion-v1-5/stable-diffusion-inpainting", steps: int = 50,
                 guidance_scale: float = 7.5, negative_prompt: str = "", device: str = "auto",
                 dtype: str = "float16") -> None:
        diffusers = _diffusers()
        path = locate(model, "inpainter", marker="model_index.json")
        self.device = resolve_device(device)
        self.pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
            path, dtype=resolve_dtype(dtype, self.device), safety_checker=None,
            requires_safety_checker=False).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.model_id, self.steps, self.guidance = model, int(steps), float(guidance_scale)
        self.negative_prompt = negative_prompt or None

    @torch.no_grad()
    def inpaint(self, comp: Composition, background: Background, seed: int) -> Image.Image:
        w, h = comp.canvas.size
        generator = torch.Generator(self.device).manual_seed(int(seed))
        return self.pipe(prompt=background.prompt, negative_prompt=self.negative_prompt, image=comp.canvas,
                         mask_image=comp.inpaint_mask, height=h, width=w, num_inference_steps=self.steps,
                         guidance_scale=self.guidance, generator=generator).images[0]


# ----------------------------------------------------------------------------------------- describer

@register("mmlink_describer", "sam_mllm")
class SamMllmDescriber:
    """This library's model (``sam_mllm.load_model``; by default InstructBLIP-Vicuna-7B, as in the
    paper) describes the main object's first image (its cut-out on white)."""

    def __init__(self, config: str = "models/instructblip_vicuna7b", checkpoint: str | None = None,
                 prompt: str = "Describe the person in this image in detail.", overrides: list[str] | None = None,
                 device: str = "auto") -> None:
        from sam_mllm.api import load_model

        self.pipe = load_model(config, checkpoint, resolve_device(device), list(overrides or []))
        self.model_id = self.pipe.cfg.model.backbone if self.pipe.cfg.model.dims is None else f"dims:{config}"
        self.prompt = prompt

    def describe(self, item: Item, seed: int) -> str:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.pipe.generate([_on_white(item.image)], self.prompt).strip()


# ----------------------------------------------------------------------------------------------- CLIP

def load_clip(model: str, device: str) -> tuple[Any, Any]:
    from transformers import CLIPModel, CLIPProcessor

    path = locate(model, "qc.clip_model")
    device = resolve_device(device)
    return CLIPModel.from_pretrained(path).to(device).eval(), CLIPProcessor.from_pretrained(path)

"""The SAM model against docs/DESIGN.md §1: equivalences, a plain reference, batching, parameters."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_batch, make_model, select

from sam_mllm.config import ModelConfig
from sam_mllm.models import build_model
from sam_mllm.models.sam import SAMModel


def _randomise_guidance(model: SAMModel, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("w_in", "w_out", "patch_weight", "context_proj"):
            if hasattr(model, name):
                for p in getattr(model, name).parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _reference_tokens(model: SAMModel, feats: torch.Tensor, q_ids: torch.Tensor, q_mask: torch.Tensor,
                      l: int, k: int, context: str, mean: bool = False) -> torch.Tensor:
    """docs/DESIGN.md §1 for one sample, written plainly: per image, a full W-stream, W-layer first."""
    nq = model.num_query_tokens
    emb = model.qformer.embeddings(input_ids=q_ids, query_embeds=model.query_tokens)
    mask_2d = torch.cat([torch.ones(1, nq), q_mask.float()], dim=1)
    additive = (1.0 - mask_2d[:, None, None, :]) * torch.finfo(torch.float32).min  # eager format
    tokens = []
    for i in range(feats.shape[0]):
        others = [m for m in range(feats.shape[0]) if context == "all" or m != i]
        q, w = emb.clone(), emb.clone()
        ctx = None
        if others:
            scores = torch.stack([torch.zeros(feats.shape[1], 1) if mean else model.patch_weight(feats[m])
                                  for m in others])
            weights = torch.softmax(scores, dim=0)
            ctx = sum(weights[j] * feats[m] for j, m in enumerate(others))[None]
        for idx, layer in enumerate(model.qformer.encoder.layer):
            if ctx is not None and idx <= k:
                if idx == l:
                    w = w + model.w_in(q)
                w = layer(w, additive, ctx, query_length=nq)
                if idx == k:
                    q = q + model.w_out(w)
            q = layer(q, additive, feats[i][None], query_length=nq)
        tokens.append(model.language_projection(q[:, :nq])[0])
    return torch.stack(tokens)


def test_zero_initialised_sam_is_instructblip(tiny_backbone, tokenizers):
    batch = make_batch(tokenizers, [3, 2])
    base = make_model(tiny_backbone, tokenizers, guidance="none")
    for options in (dict(), dict(context="others"), dict(patch_weighting="mean"), dict(guidance="linear")):
        sam = make_model(tiny_backbone, tokenizers, **{"guidance": "w_former", **options})
        with torch.no_grad():
            a, b = sam._visual_tokens(batch), base._visual_tokens(batch)
            assert (a.visual_tokens - b.visual_tokens).abs().max() <= 1e-6, options
            assert abs(sam(batch).loss.item() - base(batch).loss.item()) <= 1e-6, options


@pytest.mark.parametrize(
    "l,k,context,mean",
    [(-1, -1, "all", False), (1, 3, "all", False), (0, 2, "all", False), (2, 2, "others", False),
     (1, 3, "others", False), (-1, -1, "all", True), (0, 3, "others", True)],
)
def test_guidance_matches_plain_reference(tiny_backbone, tokenizers, l, k, context, mean):
    model = make_model(tiny_backbone, tokenizers, guide_in_layer=l, guide_out_layer=k, context=context,
                       patch_weighting="mean" if mean else "adaptive")
    _randomise_guidance(model)
    batch = make_batch(tokenizers, [3, 1, 4])
    with torch.no_grad():
        feats = model.encode_images(batch["pixel_values"], batch["image_mask"])
        got = model.perceive(feats, batch["image_mask"], batch["qformer_input_ids"],
                             batch["qformer_attention_mask"]).visual_tokens
        baseline = make_model(tiny_backbone, tokenizers, guidance="none")
        plain = baseline.perceive(feats, batch["image_mask"], batch["qformer_input_ids"],
                                  batch["qformer_attention_mask"]).visual_tokens
        for b in range(3):
            n = int(batch["image_mask"][b].sum())
            t = int(batch["qformer_attention_mask"][b].sum())
            ref = _reference_tokens(model, feats[b, :n], batch["qformer_input_ids"][b : b + 1, :t],
                                    batch["qformer_attention_mask"][b : b + 1, :t],
                                    model.guide_in_layer, model.guide_out_layer, context, mean)
            assert torch.isfinite(got[b]).all()
            assert (got[b, :n] - ref).abs().max() <= 1e-5, (b, n)
            assert (got[b, n:] == 0).all()  # padded slots stay empty
            if n > 1:
                assert (got[b, :n] - plain[b, :n]).abs().max() > 1e-3  # guidance really acts
    # with `others`, a single image has no context: exactly no guidance, and no NaN
    if context == "others":
        assert torch.equal(got[1, :1], plain[1, :1])


def test_others_is_stable_when_one_image_dominates(tiny_backbone, tokenizers):
    model = make_model(tiny_backbone, tokenizers, context="others")
    feats = torch.randn(1, 3, 17, 48)
    with torch.no_grad():
        model.patch_weight.weight.zero_()
        model.patch_weight.weight[0, 0] = 1.0
        feats[0, 0, :, 0] = 200.0  # image 0 scores e^200 higher than the others at every patch
        merged, _ = model.merge_context(feats, torch.ones(1, 3, dtype=torch.bool))
        for i in range(3):
            others = [m for m in range(3) if m != i]
            w = torch.softmax(torch.stack([model.patch_weight(feats[0, m]) for m in others]), 0)
            ref = sum(w[j] * feats[0, m] for j, m in enumerate(others))
            assert torch.allclose(merged[0, i], ref, atol=1e-4, rtol=1e-5), i


def test_batch_of_mixed_image_counts_equals_samples_alone(tiny_backbone, tokenizers):
    for options in (dict(), dict(context="others"), dict(guide_in_layer=1, guide_out_layer=2)):
        model = make_model(tiny_backbone, tokenizers, **options)
        _randomise_guidance(model, seed=3)
        batch = make_batch(tokenizers, [1, 3, 5], seed=2)
        with torch.no_grad():
            together = model._visual_tokens(batch).visual_tokens
            embeds, mask, pos, labels = model._assemble(together, batch["image_mask"], batch["input_ids"],
                                                        batch["attention_mask"], batch["labels"])
            logits = model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
            for i in range(3):
                alone = select(batch, i)
                n = int(alone["image_mask"].sum())
                tokens = model._visual_tokens(alone).visual_tokens
                assert (together[i, :n] - tokens[0]).abs().max() <= 1e-5, (options, i)
                e1, m1, p1, _ = model._assemble(tokens, alone["image_mask"], alone["input_ids"],
                                                alone["attention_mask"], alone["labels"])
                l1 = model.language_model(inputs_embeds=e1, attention_mask=m1, position_ids=p1).logits
                width = l1.shape[1]
                assert (logits[i, -width:] - l1[0]).abs().max() <= 1e-4, (options, i)
                assert abs(model(alone).loss.item() - torch.nn.functional.cross_entropy(
                    logits[i, -width:-1], labels[i, -width + 1:], ignore_index=-100).item()) <= 1e-5


def test_generate_batched_equals_alone(tiny_backbone, tokenizers):
    model = make_model(tiny_backbone, tokenizers)
    _randomise_guidance(model)
    batch = make_batch(tokenizers, [2, 1, 3], seed=5)
    together = model.generate(batch, max_new_tokens=6, num_beams=2)
    assert len(together) == 3 and all(isinstance(t, str) for t in together)
    assert together == [model.generate(select(batch, i), max_new_tokens=6, num_beams=2)[0] for i in range(3)]


def test_only_trainable_parameters_get_gradients_and_frozen_stay_eval(tiny_backbone, tokenizers):
    model = make_model(tiny_backbone, tokenizers)
    _randomise_guidance(model)  # zero W_out would block the gradient of W_in
    model.train()
    for name, module in model.named_children():
        expected = name in ("patch_weight", "w_in", "w_out", "language_projection")
        assert module.training == expected, name
    loss = model(make_batch(tokenizers, [2, 3])).loss
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            if name != "patch_weight.bias":
                assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # The patch-weight bias shifts every image's score equally, which the softmax ignores: its gradient is
    # zero up to rounding (exactly zero with some thread counts), far below the weight's tiny gradient.
    weight, bias = model.patch_weight.weight.grad.abs().sum(), model.patch_weight.bias.grad.abs().sum()
    assert bias <= 1e-2 * weight, (bias, weight)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_backbone, tokenizers):
    batch = make_batch(tokenizers, [2, 3])
    grads = []
    for gc in (False, True):
        model = make_model(tiny_backbone, tokenizers, gradient_checkpointing=gc)
        _randomise_guidance(model)
        model.train()
        model(batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_7b_trainable_parameter_count_on_meta_device():
    model = build_model(ModelConfig(name="sam", dims="7b"), device="meta")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 4_332_417
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(not n.startswith(("patch_weight", "w_in", "w_out", "language_projection")) for n in frozen)
    assert sum(p.numel() for p in model.parameters()) > 7_000_000_000
    data_row = build_model(ModelConfig(name="instructblip", dims="7b"), device="meta")
    assert sum(p.numel() for p in data_row.parameters() if p.requires_grad) == 768 * 4096 + 4096


def test_variants_by_registry_name():
    from sam_mllm import registry

    assert {"instructblip", "sam", "sam_bsg_mean", "sam_linear"} <= set(registry.names("model"))
    with pytest.raises(KeyError, match="registered models: .*sam"):
        registry.get("model", "sam_typo")
    with pytest.raises(ValueError, match="unknown group"):
        build_model(ModelConfig(name="instructblip", dims="tiny", trainable=["w_in"]))


def test_offline_hub_id_fails_fast_with_a_clear_message(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub")}
    code = ("from sam_mllm.config import ModelConfig\nfrom sam_mllm.models import build_model\n"
            "build_model(ModelConfig(backbone='Salesforce/instructblip-vicuna-7b'))")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "BackboneNotFoundError" in proc.stderr
    assert "Salesforce/instructblip-vicuna-7b" in proc.stderr and "model.backbone=" in proc.stderr
    assert "HF_HUB_OFFLINE" in proc.stderr
    assert time.monotonic() - start < 60

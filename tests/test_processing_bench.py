"""Image transforms, the data order of training, bf16, non-finite losses, and the benchmark's baseline."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import make_batch, make_model
from PIL import Image

from sam_mllm.bench import flop_ceilings, perception_flops, qformer_layer_flops, released_order
from sam_mllm.data.processing import CLIP_MEAN, CLIP_STD, ImageTransform
from sam_mllm.data.sampling import MixtureOrder, step_positions


def test_eval_transform_is_bicubic_resize_with_clip_normalisation():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    out = ImageTransform(32)(im)
    ref = np.asarray(im.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255.0
    ref = (ref - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    assert out.shape == (3, 32, 32)
    assert torch.allclose(out, torch.from_numpy(ref).permute(2, 0, 1), atol=1e-6)
    assert ImageTransform(32).deterministic and not ImageTransform(32, train=True).deterministic


def test_train_transform_crops_without_flipping_by_default():
    # left half black, right half white: a crop never turns that around unless it flips
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[:, 32:] = 255
    t = ImageTransform(16, train=True)
    for seed in range(20):
        out = t(Image.fromarray(arr), random.Random(seed))
        assert out[:, :, 0].mean() <= out[:, :, -1].mean()
    a, b = t(Image.fromarray(arr), random.Random(5)), t(Image.fromarray(arr), random.Random(5))
    assert torch.equal(a, b)  # same draw, same crop (exact resume)
    flipped = ImageTransform(16, train=True, hflip=True)
    assert any(flipped(Image.fromarray(arr), random.Random(s))[:, :, 0].mean() >
               flipped(Image.fromarray(arr), random.Random(s))[:, :, -1].mean() for s in range(20))


def test_mixture_order_follows_weights_and_is_deterministic():
    order = MixtureOrder([100, 10], [3.0, 1.0], seed=1, epoch_length=4000)
    draws = [order[p] for p in range(4000)]
    share = Counter(d for d, _ in draws)[0] / 4000
    assert abs(share - 0.75) < 0.03
    assert {i for d, i in draws if d == 1} == set(range(10))  # the small set cycles through all
    assert draws == [MixtureOrder([100, 10], [3.0, 1.0], seed=1, epoch_length=4000)[p] for p in range(4000)]
    with pytest.raises(ValueError, match="at least one sample"):
        MixtureOrder([3, 0], [1, 1], seed=0)


def test_step_positions_do_not_depend_on_the_process_count():
    one = sorted(p for mb in step_positions(7, 20, 5, 0, 1) for p in mb)
    two = sorted(p for r in range(2) for mb in step_positions(7, 20, 5, r, 2) for p in mb)
    assert one == two == list(range(140, 160))


def test_bf16_backbone_trains_float32_adapters(tiny_backbone, tokenizers):
    model = make_model(tiny_backbone, tokenizers)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    model.train()
    loss = model(make_batch(tokenizers, [2, 1])).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.w_out.weight.dtype == torch.float32 and model.w_out.weight.grad is not None


def test_released_order_computes_what_perceive_computes(tiny_backbone, tokenizers):
    model = make_model(tiny_backbone, tokenizers)
    with torch.no_grad():
        for p in (*model.w_in.parameters(), *model.w_out.parameters()):
            p.normal_(0, 0.3)
    batch = make_batch(tokenizers, [3, 3])
    with torch.no_grad():
        ours = model._visual_tokens(batch).visual_tokens.flatten(1, 2)
        theirs = released_order(model, batch)
    assert (ours - theirs).abs().max() < 1e-5


def test_perception_flops_count_the_w_stream_the_released_loop_repeats(tiny_backbone, tokenizers):
    model = make_model(tiny_backbone, tokenizers)  # l = k = last layer
    layers = [qformer_layer_flops(model, layer, 24) for layer in model.qformer.encoder.layer]
    assert all(f > 0 for f in layers)
    ours, theirs = perception_flops(model, 1, 24)
    assert ours == theirs  # one image: the same work in either order
    ours, theirs = perception_flops(model, 5, 24)
    assert theirs - ours == pytest.approx(4 * sum(layers[:-1]))  # W-stream below l, 4 extra times


def test_flop_ceilings_at_7b_dimensions_need_no_weights():
    rows = flop_ceilings("7b", 2, [1, 5])["sections"]["flop_ceilings"]
    assert rows[0]["perception_ceiling"] == pytest.approx(1.0)
    assert 1.0 < rows[1]["perception_ceiling"] < 1.1  # the ViT dominates perception at 7B
    assert 1.2 < rows[1]["cache_ceiling"] < 1.6  # the "about 1.4x" ceiling
    assert rows[1]["vit_gflop_per_image"] == pytest.approx(2 * 986e6 * 257 / 1e9, rel=0.05)

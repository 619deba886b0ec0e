"""MMFS (MM-Interleaved's feature synchronizer): the released code's golden outputs, and the variants
``mmfs`` / ``sam_mmfs`` inserted into the LLM by hooks (α = 0 is InstructBLIP, batching, caching)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_batch, make_model, select
from safetensors.torch import load_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from sam_mllm.config import Config, ModelConfig, ParamGroupConfig
from sam_mllm.models import build_model
from sam_mllm.models.mmfs import (
    FeatureSynchronizer,
    SynchronizerBlock,
    SynchronizerContext,
    official_state_dict,
    pack_features,
    visibility_mask,
)
from sam_mllm.train import make_optimizer

# Another fixture folder (other dimensions, same layout) can be checked with SAM_MLLM_MMFS_FIXTURE=DIR.
FIXTURE = Path(os.environ.get("SAM_MLLM_MMFS_FIXTURE", Path(__file__).parent / "fixtures" / "official_mmfs"))
TOL = 1e-5


def load_official_fixture(folder: Path = FIXTURE) -> dict:
    """Config, tensors, and our synchronizer block built from the fixture's config and loaded from
    its official ``llama_cross_attn.*`` names; every dimension comes from fixture.json."""
    meta = json.loads((folder / "fixture.json").read_text())
    cfg = meta["config"]
    t = load_file(folder / "fixture.safetensors")
    assert cfg["value_inner_dim"] == cfg["d_value"], "the official LLM-side MMFS has ratio = d_value / d_model"
    shapes = [(s, s) for s in cfg["spatial_shapes"]]
    block = SynchronizerBlock(
        cfg["d_model"], cfg["d_value"], eps=cfg["rms_norm_eps"], heads=cfg["n_heads"], points=cfg["n_points"],
        levels=cfg["n_levels"], base_spatial_shape=cfg["base_spatial_shape"],
        max_images=cfg["max_num_image_per_seq"], offset_init=cfg["offset_init_magnitude"],
    )
    prefix = "llama_cross_attn."
    block.load_state_dict({k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}, strict=True)
    return dict(cfg=cfg, t=t, block=block.eval(), shapes=shapes)


def official_visibility(text_ids: torch.Tensor, num_images: torch.Tensor, special: dict) -> torch.Tensor:
    """Images start one token after their ``<soi>``; ``<s>`` starts a document."""
    n_max = int(num_images.max())
    starts = torch.full((text_ids.shape[0], n_max), -1, dtype=torch.long)
    for b, row in enumerate(text_ids):
        pos = (row == special["soi_token_id"]).nonzero().flatten() + 1
        assert len(pos) == int(num_images[b])
        starts[b, : len(pos)] = pos
    return visibility_mask(starts, text_ids.shape[1], document_starts=text_ids == special["bos_token_id"])


@pytest.fixture(scope="module")
def official():
    return load_official_fixture()


def _close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.shape == want.shape, name
    diff = (got - want).abs().max().item()
    assert diff <= TOL, f"{name}: max |diff| {diff:.3g} > {TOL}"


def test_official_visibility_and_packing_exact(official):
    cfg, t = official["cfg"], official["t"]
    vis = official_visibility(t["inputs.text_ids"], t["inputs.num_image_per_seq"], cfg["special_token_dict"])
    assert torch.equal(vis.float(), t["expected.cross_attention_mask"])
    levels = [t[f"inputs.multiscale_features.{i}"] for i in range(cfg["n_levels"])]
    packed = pack_features(levels, t["inputs.num_image_per_seq"].tolist())
    assert torch.equal(packed, t["expected.mmfs_features_mm"])


def test_official_mmfs_outputs(official):
    t, block, shapes = official["t"], official["block"], official["shapes"]
    mask = t["expected.cross_attention_mask"]
    with torch.no_grad():
        _close(block.attn(t["inputs.mmfs_query"], t["expected.mmfs_features_mm"], mask, shapes),
               t["expected.mmfs.output"], "mmfs.output")
        saved = block.attn.ignore_token.clone()
        block.attn.ignore_token.zero_()
        _close(block.attn(t["inputs.mmfs_query"], t["expected.mmfs_features_mm"], mask, shapes),
               t["expected.mmfs.output_ignore_token_zero"], "mmfs.output_ignore_token_zero")
        block.attn.ignore_token.copy_(saved)
        # Padded image slots change nothing, exactly (the official fixture perturbs them the same way).
        feats = t["expected.mmfs_features_mm"].clone()
        feats[mask.sum(1) == 0] += 100.0
        assert torch.equal(block.attn(t["inputs.mmfs_query"], feats, mask, shapes),
                           block.attn(t["inputs.mmfs_query"], t["expected.mmfs_features_mm"], mask, shapes))


def test_official_decoder_layer_with_hooks(official):
    """transformers' LlamaDecoderLayer + our two hooks reproduce the official MMFS decoder layer."""
    cfg, t, shapes = official["cfg"], official["t"], official["shapes"]
    llm = cfg["llm"]
    config = LlamaConfig(
        hidden_size=llm["hidden_size"], num_attention_heads=llm["num_attention_heads"],
        num_key_value_heads=llm["num_attention_heads"], intermediate_size=llm["intermediate_size"],
        hidden_act=llm["hidden_act"], rms_norm_eps=cfg["rms_norm_eps"], attention_bias=llm["attention_bias"],
        mlp_bias=llm["mlp_bias"], rope_theta=llm["rope_theta"], num_hidden_layers=1,
    )
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    layer.load_state_dict({k: v for k, v in t.items() if k.split(".")[0] in
                           ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")}, strict=True)
    sync = FeatureSynchronizer(torch.nn.ModuleList([layer]), cfg["d_value"], every=1, eps=cfg["rms_norm_eps"],
                               heads=cfg["n_heads"], points=cfg["n_points"], levels=cfg["n_levels"],
                               base_spatial_shape=cfg["base_spatial_shape"],
                               max_images=cfg["max_num_image_per_seq"])
    # The documented name map from an MMInterleaved checkpoint (mm_decoder.layers.{i}.llama_cross_attn.*).
    sync.load_state_dict(official_state_dict({f"mm_decoder.layers.0.{k}": v for k, v in t.items()}), strict=True)
    x = t["inputs.layer_hidden_states"]
    b, s, _ = x.shape
    num = t["inputs.num_image_per_seq"]
    ctx = SynchronizerContext(
        features=t["expected.mmfs_features_mm"], visibility=t["expected.cross_attention_mask"].bool(),
        image_mask=torch.arange(int(num.max()))[None] < num[:, None], spatial_shapes=shapes,
    )
    positions = torch.arange(s)[None].expand(b, -1)
    seen = {}
    layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.setdefault("m", a[0]))
    with torch.no_grad():
        out = layer(x, position_ids=positions, position_embeddings=LlamaRotaryEmbedding(config)(x, positions),
                    mmfs=ctx)
        h = t["expected.layer.mmfs_block_input"]
        gated = sync.blocks["0"].delta(h, sync.blocks["0"].values(ctx.features), ctx.visibility, shapes)
    _close(gated, t["expected.layer.llama_cross_attn_output"], "layer.llama_cross_attn_output")
    _close(seen["m"], t["expected.layer.mmfs_block_output"], "layer.mmfs_block_output")
    _close(out, t["expected.layer.output"], "layer.output")


# ------------------------------------------------------------------------------ variants in SAMModel


def _mmfs_model(backbone, tokenizers, gate: float = 0.0, seed: int = 0, guidance: str = "none", **mmfs):
    """A tiny model with a synchronizer in every LLM layer, its projections randomised (so that a
    zero gate is the only thing keeping it silent) and every gate set to ``gate``."""
    torch.manual_seed(seed)  # the synchronizer's own initialisation
    model = make_model(backbone, tokenizers, guidance=guidance, mmfs={"every": 1, **mmfs})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.mmfs.named_parameters():
            if name.endswith("gate"):
                p.fill_(gate)
            elif "norm" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def test_alpha_zero_is_instructblip_bit_for_bit(tiny_backbone, tokenizers):
    batch = make_batch(tokenizers, [1, 3, 5], seed=1)
    base = make_model(tiny_backbone, tokenizers, guidance="none")
    model = _mmfs_model(tiny_backbone, tokenizers, gate=0.0)
    with torch.no_grad():
        assert torch.equal(model(batch).logits, base(batch).logits)
        kw = dict(max_new_tokens=6, num_beams=5, return_ids=True)
        assert torch.equal(model.generate(batch, **kw), base.generate(batch, **kw))
        sam, sam_mmfs = (make_model(tiny_backbone, tokenizers), _mmfs_model(tiny_backbone, tokenizers, guidance="w_former"))
        assert torch.equal(sam_mmfs(batch).logits, sam(batch).logits)
        for block in model.mmfs.blocks.values():
            block.gate.fill_(0.5)
        assert (model(batch).logits - base(batch).logits).abs().max() > 1e-3  # the gate is what silenced it


def test_gradients_at_zero_and_nonzero_gate_and_frozen_parts_untouched(tiny_backbone, tokenizers):
    batch = make_batch(tokenizers, [2, 3], seed=2)
    for gate in (0.0, 0.5):
        model = _mmfs_model(tiny_backbone, tokenizers, gate=gate).train()
        assert model.trainable == ["mmfs", "language_projection"]
        model(batch).loss.backward()
        for name, p in model.named_parameters():
            if not name.startswith(("mmfs.", "language_projection.")):
                assert p.grad is None, name
            elif name.startswith("mmfs.") and gate == 0.0:
                # d tanh(g) x / dx = tanh(0) = 0: only the gates learn at the start.
                assert (p.grad.abs().sum() > 0) == name.endswith(".gate"), name
            else:
                assert p.grad.abs().sum() > 0, name
    cfg = Config()
    cfg.train.param_groups = [ParamGroupConfig(match="mmfs.*.sampling_offsets.*", lr_scale=0.1, weight_decay=0.0),
                              ParamGroupConfig(match="mmfs.*.gate", weight_decay=0.0)]
    opt = make_optimizer(model, cfg)
    ids = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        names = [ids[id(p)] for p in group["params"]]
        if any("sampling_offsets" in n for n in names):
            assert all("sampling_offsets" in n for n in names) and len(names) == 4  # weight, bias x 2 layers
            assert group["lr_scale"] == 0.1 and group["weight_decay"] == 0.0
        if any(n.endswith(".gate") for n in names):
            assert all(n.endswith(".gate") for n in names) and group["weight_decay"] == 0.0
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    cfg.train.param_groups = [ParamGroupConfig(match="mmfs.*.no_such_thing")]
    with pytest.raises(ValueError, match="no_such_thing"):
        make_optimizer(model, cfg)


def test_padded_batch_equals_samples_alone_and_padded_images_change_nothing(tiny_backbone, tokenizers):
    batch = make_batch(tokenizers, [1, 3, 5], seed=3)
    for guidance in ("none", "w_former"):
        model = _mmfs_model(tiny_backbone, tokenizers, gate=0.7, guidance=guidance, seed=4)
        with torch.no_grad():
            feats = model.encode_images(batch["pixel_values"], batch["image_mask"])
            together = model({**batch, "image_embeds": feats}).logits
            noisy = feats + torch.randn(feats.shape) * 10 * (~batch["image_mask"])[:, :, None, None]
            assert torch.equal(model({**batch, "image_embeds": noisy}).logits, together)
            for i in range(3) if guidance == "none" else [1]:
                alone = model(select(batch, i)).logits[0]
                assert (together[i, -alone.shape[0]:] - alone).abs().max() <= 1e-5, (guidance, i)
            if guidance == "none":  # beam rows map to their sample
                kw = dict(max_new_tokens=5, num_beams=3, return_ids=True)
                ids = model.generate(batch, **kw)
                for i in range(3):
                    one = model.generate(select(batch, i), **kw)[0]
                    assert torch.equal(ids[i, : len(one)], one), i


def test_visibility_follows_visual_tokens_and_causality(tiny_backbone, tokenizers):
    model = _mmfs_model(tiny_backbone, tokenizers, gate=0.7, seed=5)
    batch = make_batch(tokenizers, [3, 1], seed=6)
    with torch.no_grad():
        p = model._visual_tokens(batch)
        embeds, mask, _, _ = model._assemble(p.visual_tokens, batch["image_mask"], batch["input_ids"],
                                             batch["attention_mask"])
        starts = model._image_starts(batch["image_mask"], batch["attention_mask"], model.num_query_tokens)
        assert starts[1, 1:].eq(-1).all()
        for b, n in batch["image_mask"].nonzero().tolist():
            assert torch.equal(embeds[b, starts[b, n]], p.visual_tokens[b, n, 0])
        vis = model._mmfs_inputs(p, batch, embeds.shape[1])["mmfs"].visibility
        assert vis[0, starts[0, 2] - 1].tolist() == [True, True, False]  # image 2 unseen before its tokens
        assert vis[0, -1].tolist() == [True, True, True] and vis[1, -1].tolist() == [True, False, False]
        assert not vis[:, : int(starts[0, 0])].any()  # left padding and nothing before the first image
        # Changing image 2 leaves every position before its first visual token exactly as it was.
        feats = model.encode_images(batch["pixel_values"], batch["image_mask"])
        changed = feats.clone()
        changed[0, 2] += 1.0
        a = model({**batch, "image_embeds": feats}).logits[0]
        b = model({**batch, "image_embeds": changed}).logits[0]
        s = int(starts[0, 2])
        assert torch.equal(a[:s], b[:s]) and (a[s:] - b[s:]).abs().max() > 1e-4


def test_greedy_with_kv_cache_equals_recomputation(tiny_backbone, tokenizers):
    model = _mmfs_model(tiny_backbone, tokenizers, gate=0.7, seed=7, levels="pyramid")
    batch = make_batch(tokenizers, [2, 1, 3], seed=8)
    kw = dict(max_new_tokens=6, num_beams=1, return_ids=True)
    assert torch.equal(model.generate(batch, **kw), model.generate(batch, use_cache=False, **kw))


def test_7b_mmfs_parameter_count_on_meta_device():
    projection = 768 * 4096 + 4096
    # Per layer (D 4096, vision width 1408, 16 heads, 8 points, 1 level): W_q 16,781,312 + PosEmbed
    # 204,800 + offsets 1,048,832 + attention weights 589,968 + value 1,983,872 + output 5,771,264 +
    # null value 1,408 + norms 5,504 + gate 1 = 26,386,961, in layers 0, 4, ..., 28 of Vicuna-7B.
    for name, levels, sync in (("mmfs", "single", 8 * 26_386_961), ("sam_mmfs", "pyramid", 220_535_176)):
        cfg = ModelConfig(name=name, dims="7b")
        cfg.mmfs.levels = levels
        model = build_model(cfg, device="meta")
        assert sorted(model.mmfs.blocks) == ["0", "12", "16", "20", "24", "28", "4", "8"]
        assert sum(p.numel() for p in model.mmfs.parameters()) == sync
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == sync + (projection if name == "mmfs" else 4_332_417)
        assert not any("mmfs" in k or "cross_attn" in k for k in model.language_model.state_dict())


def test_gradient_checkpointing_replays_the_hooks(tiny_backbone, tokenizers):
    batch = make_batch(tokenizers, [2, 3], seed=9)
    grads = []
    for gc in (False, True):
        model = _mmfs_model(tiny_backbone, tokenizers, gate=0.5, seed=10)
        if gc:
            model.enable_gradient_checkpointing()
        model.train()
        model(batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])

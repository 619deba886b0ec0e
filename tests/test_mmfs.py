"""MMFS (MM-Interleaved's feature synchronizer): the released code's golden outputs, and the variants
``mmfs`` / ``sam_mmfs`` inserted into the LLM by hooks (α = 0 is InstructBLIP, batching, caching)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from sam_mllm.models.mmfs import (
    FeatureSynchronizer,
    SynchronizerBlock,
    SynchronizerContext,
    pack_features,
    visibility_mask,
)

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
    sync.blocks["0"].load_state_dict(official["block"].state_dict())
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

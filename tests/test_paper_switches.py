"""Switches for the SAM paper's remaining experiments: trainable parameter patterns (+MMICL)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, make_model, select

from sam_mllm.config import ModelConfig, load_config
from sam_mllm.models import build_model, load_trainable, save_trainable
from sam_mllm.models.trainable import TrainableError, expand_braces

MMICL = ["language_projection", "language_model.model.layers.{0,1}.self_attn.{q_proj,v_proj}"]


def test_brace_expansion():
    assert expand_braces("a.{0,1}.{q,v}") == ["a.0.q", "a.0.v", "a.1.q", "a.1.v"]
    assert expand_braces("x.{a,b{1,2}}") == ["x.a", "x.b1", "x.b2"]
    assert expand_braces("plain") == ["plain"]
    with pytest.raises(TrainableError, match="unbalanced"):
        expand_braces("a.{0,1")


def test_mmicl_trains_exactly_the_named_tensors_at_7b_dims():
    cfg = load_config("train/ablation_mmicl")
    assert cfg.model.trainable == MMICL
    cfg.model.dims, cfg.model.lavis_checkpoint = "7b", None
    model = build_model(cfg.model, device="meta")
    trained = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"language_model.model.layers.{i}.self_attn.{m}.weight" for i in (0, 1) for m in ("q_proj", "v_proj")}
    expected |= {"language_projection.weight", "language_projection.bias"}
    assert set(trained) == expected
    # 4 LLaMA projections of 4096 x 4096 (no bias) + the 768 -> 4096 language projection.
    assert sum(trained.values()) == 4 * 4096 * 4096 + 768 * 4096 + 4096 == 70_258_688


def test_pattern_typo_is_an_error_listing_near_names(tiny_backbone, tokenizers):
    with pytest.raises(TrainableError, match=r"q_prj.*nearest parameter names: .*layers\.0\.self_attn\.q_proj"):
        make_model(tiny_backbone, tokenizers, guidance="none",
                   trainable=["language_model.model.layers.{0,1}.self_attn.q_prj"])
    # Each brace alternative must match on its own: layer 7 does not exist in the tiny LLM.
    with pytest.raises(TrainableError, match=r"layers\.7\.self_attn"):
        make_model(tiny_backbone, tokenizers, guidance="none",
                   trainable=["language_model.model.layers.{0,7}.self_attn.q_proj"])
    # Wildcards select too, and a wildcard matching nothing is the same error.
    model = make_model(tiny_backbone, tokenizers, guidance="none", trainable=["language_model.*.v_proj"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "language_model.model.layers.0.self_attn.v_proj.weight", "language_model.model.layers.1.self_attn.v_proj.weight"}
    with pytest.raises(TrainableError, match="matches no parameter"):
        make_model(tiny_backbone, tokenizers, guidance="none", trainable=["language_model.*.w_proj"])


def test_pattern_groups_get_gradients_and_round_trip_through_the_adapter(tiny_backbone, tokenizers, tmp_path):
    model = make_model(tiny_backbone, tokenizers, guidance="none", trainable=MMICL)
    model.train()
    # A named module inside the frozen LLM follows train(); its frozen neighbours stay in eval mode.
    assert model.language_model.model.layers[0].self_attn.q_proj.training
    assert not model.language_model.model.layers[0].self_attn.k_proj.training
    batch = make_batch(tokenizers, [2, 3])
    model(batch).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)
    with torch.no_grad():
        for n in with_grad:
            model.get_parameter(n).add_(0.01)
    path = save_trainable(model, tmp_path)
    fresh = make_model(tiny_backbone, tokenizers, guidance="none", trainable=MMICL)
    load_trainable(fresh, path)
    for n, p in model.named_parameters():
        assert torch.equal(p, fresh.get_parameter(n)), n


def test_group_names_still_work_and_unknown_groups_fail():
    model = build_model(ModelConfig(name="instructblip", dims="tiny", trainable=["query_tokens", "language_projection"]))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "query_tokens", "language_projection.weight", "language_projection.bias"}
    with pytest.raises(ValueError, match="unknown group.*groups of this model"):
        build_model(ModelConfig(name="instructblip", dims="tiny", trainable=["w_in"]))


# ------------------------------------------------------------------------------------------ +VPG-C


def _vpgc_pair(tiny_backbone, tokenizers):
    base = make_model(tiny_backbone, tokenizers, guidance="none")
    vpgc = make_model(tiny_backbone, tokenizers, guidance="none", vpgc=True)
    return base, vpgc


def test_untrained_vpgc_is_instructblip_bit_for_bit(tiny_backbone, tokenizers):
    base, vpgc = _vpgc_pair(tiny_backbone, tokenizers)
    assert vpgc.vpgc.layer == 1 and vpgc.trainable == ["vpgc", "language_projection"]
    batch = make_batch(tokenizers, [2, 3, 1])
    assert torch.equal(base(batch).logits, vpgc(batch).logits)
    gen = {k: v for k, v in batch.items() if k != "labels"}
    assert torch.equal(base.generate(gen, return_ids=True, max_new_tokens=4, num_beams=2),
                       vpgc.generate(gen, return_ids=True, max_new_tokens=4, num_beams=2))


def test_vpgc_trains_only_its_groups_and_acts_at_the_visual_tokens(tiny_backbone, tokenizers):
    from sam_mllm.models.vpgc import visual_positions

    _, vpgc = _vpgc_pair(tiny_backbone, tokenizers)
    with torch.no_grad():
        vpgc.vpgc.state_out.weight.normal_(std=0.5)
        vpgc.vpgc.state_in.weight.normal_(std=0.5)
    batch = make_batch(tokenizers, [2, 3])
    vpgc.train()
    vpgc(batch).loss.backward()
    with_grad = {n for n, p in vpgc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {n for n, p in vpgc.named_parameters() if p.requires_grad}
    assert all(n.startswith(("vpgc.", "language_projection.")) for n in with_grad)
    assert {"vpgc.query_tokens", "vpgc.state_in.weight", "vpgc.state_out.weight"} <= with_grad
    # The positions the hook writes to are the visual tokens _assemble placed.
    vpgc.eval()
    perception = vpgc._visual_tokens(batch)
    embeds, *_ = vpgc._assemble(perception.visual_tokens, batch["image_mask"], batch["input_ids"],
                                batch["attention_mask"], batch["labels"])
    pos = visual_positions(batch["image_mask"], batch["attention_mask"], vpgc.num_query_tokens)
    for i, n in ((0, 0), (0, 1), (1, 2)):
        assert torch.equal(embeds[i, pos[i, n]], perception.visual_tokens[i, n])
    assert (pos[0, 2] == -1).all()
    # A batch (with beams in generation) computes what each sample computes alone.
    gen = {k: v for k, v in batch.items() if k != "labels"}
    together = vpgc.generate(gen, return_ids=True, max_new_tokens=3, num_beams=2)
    logits = vpgc(batch).logits
    for i in range(2):
        alone = select(batch, i)
        ref = vpgc(alone).logits[0]
        assert torch.allclose(logits[i, -len(ref):], ref, atol=1e-5)
        ids = vpgc.generate({k: v for k, v in alone.items() if k != "labels"}, return_ids=True, max_new_tokens=3,
                            num_beams=2)
        assert torch.equal(together[i, -ids.shape[1]:], ids[0])


def test_vpgc_config_and_7b_count():
    cfg = load_config("train/ablation_vpgc")
    assert cfg.model.name == "vpgc"
    cfg.model.dims, cfg.model.lavis_checkpoint = "7b", None
    model = build_model(cfg.model, device="meta")
    assert model.vpgc.layer == 16
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # query copy 32x768 + 4096->768 + 768->4096 maps + the language projection.
    assert trained == 32 * 768 + (4096 * 768 + 768) + (768 * 4096 + 4096) + (768 * 4096 + 4096)

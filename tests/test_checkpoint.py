"""LAVIS conversion, the released code's golden outputs, and our adapter save/load round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_batch, make_model
from safetensors.torch import load_file

from sam_mllm.models.backbone import build_from_dims
from sam_mllm.models.checkpoint import (
    CheckpointError,
    convert_lavis_state_dict,
    load_lavis_checkpoint,
    load_trainable,
    save_trainable,
)
from sam_mllm.models.sam import SAMModel

FIXTURE = Path(__file__).parent / "fixtures" / "official_sam"


def _lavis_state_dict(model: SAMModel) -> dict[str, torch.Tensor]:
    """Every parameter of ``model`` under its LAVIS name, written from LAVIS's naming scheme."""
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    dv, dq, nq = cfg.vision_config.hidden_size, cfg.qformer_config.hidden_size, model.num_query_tokens
    patch = cfg.vision_config.patch_size
    num_pos = (cfg.vision_config.image_size // patch) ** 2 + 1

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {"visual_encoder.cls_token": r(1, 1, dv), "visual_encoder.pos_embed": r(1, num_pos, dv),
          "visual_encoder.patch_embed.proj.weight": r(dv, 3, patch, patch),
          "visual_encoder.patch_embed.proj.bias": r(dv), "ln_vision.weight": r(dv), "ln_vision.bias": r(dv),
          "query_tokens": r(1, nq, dq), "llm_proj.weight": r(cfg.text_config.hidden_size, dq),
          "llm_proj.bias": r(cfg.text_config.hidden_size), "attn.weight": r(1, dv), "attn.bias": r(1),
          "Qformer.bert.embeddings.position_ids": torch.arange(cfg.qformer_config.max_position_embeddings)[None]}
    for name in ("one_2_muliple", "multiple_2_one"):
        sd[f"Qformer.bert.encoder.{name}.0.weight"] = r(dq, dq)
        sd[f"Qformer.bert.encoder.{name}.0.bias"] = r(dq)
    for i in range(cfg.vision_config.num_hidden_layers):
        p = f"visual_encoder.blocks.{i}."
        sd.update({p + "norm1.weight": r(dv), p + "norm1.bias": r(dv), p + "norm2.weight": r(dv),
                   p + "norm2.bias": r(dv), p + "attn.qkv.weight": r(3 * dv, dv), p + "attn.q_bias": r(dv),
                   p + "attn.v_bias": r(dv), p + "attn.proj.weight": r(dv, dv), p + "attn.proj.bias": r(dv),
                   p + "mlp.fc1.weight": r(cfg.vision_config.intermediate_size, dv),
                   p + "mlp.fc1.bias": r(cfg.vision_config.intermediate_size),
                   p + "mlp.fc2.weight": r(dv, cfg.vision_config.intermediate_size), p + "mlp.fc2.bias": r(dv)})
    # The Q-Former in BERT naming: ours with ``qformer.`` -> ``Qformer.bert.`` and the two renames.
    for key, value in model.qformer.state_dict().items():
        lavis = "Qformer.bert." + key.replace("attention.attention.", "attention.self.")
        lavis = lavis.replace("embeddings.layernorm.", "embeddings.LayerNorm.")
        sd[lavis] = r(*value.shape)
    for key, value in model.language_model.state_dict().items():
        sd["llm_model." + key] = r(*value.shape)
    return sd


def test_full_lavis_state_dict_converts_with_no_missing_or_unexpected_keys(tiny_backbone, tokenizers):
    model = make_model(tiny_backbone, tokenizers)
    lavis = _lavis_state_dict(model)
    assert any(k.startswith("Qformer.bert.encoder.layer.0.attention.self.") for k in lavis)
    converted = convert_lavis_state_dict(lavis)
    assert set(converted) == set(model.state_dict())
    missing = load_lavis_checkpoint(model, lavis, strict=True)
    assert missing == []
    assert torch.equal(model.w_in.weight, lavis["Qformer.bert.encoder.one_2_muliple.0.weight"])
    qkv_bias = model.vision_model.encoder.layers[1].self_attn.qkv.bias
    dv = qkv_bias.shape[0] // 3
    assert torch.equal(qkv_bias[:dv], lavis["visual_encoder.blocks.1.attn.q_bias"])
    assert torch.equal(qkv_bias[dv:2 * dv], torch.zeros(dv))
    assert torch.equal(qkv_bias[2 * dv:], lavis["visual_encoder.blocks.1.attn.v_bias"])


def test_lavis_errors_name_the_keys(tiny_backbone, tokenizers):
    model = make_model(tiny_backbone, tokenizers)
    with pytest.raises(CheckpointError, match="no known mapping.*mystery"):
        load_lavis_checkpoint(model, {"mystery.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="shape mismatch.*language_projection.weight"):
        load_lavis_checkpoint(model, {"llm_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="not found"):
        load_lavis_checkpoint(model, "/nonexistent/sam.pth")


@pytest.mark.parametrize("variant", ["guided", "baseline"])
def test_released_code_golden_outputs(variant):
    """Our model, loaded through the LAVIS converter, reproduces the released implementation."""
    meta = json.loads((FIXTURE / "fixture.json").read_text())
    t = load_file(str(FIXTURE / "fixture.safetensors"))
    weights = {k: v for k, v in t.items() if k.split(".")[0] not in ("inputs", "expected", "debug")}
    guided = variant == "guided"
    if not guided:  # the baseline is plain InstructBLIP: drop SAM's parameters
        weights = {k: v for k, v in weights.items()
                   if not k.startswith("attn.") and "one_2_muliple" not in k and "multiple_2_one" not in k}
    c = meta["hf_qformer_config"]
    dims = {"preset": "tiny", "qformer_hidden": c["hidden_size"], "qformer_layers": c["num_hidden_layers"],
            "qformer_heads": c["num_attention_heads"], "qformer_intermediate": c["intermediate_size"],
            "qformer_vocab": c["vocab_size"], "qformer_max_positions": c["max_position_embeddings"],
            "vision_hidden": c["encoder_hidden_size"], "num_query_tokens": meta["config"]["query_length"],
            "llm_hidden": meta["dims"]["D_llm"]}
    model = SAMModel(build_from_dims(dims), guidance="w_former" if guided else "none").eval()
    load_lavis_checkpoint(model, weights)
    x = t["inputs.image_embeds"]
    with torch.no_grad():
        out = model.perceive(x, torch.ones(x.shape[:2], dtype=torch.bool), t["inputs.qformer_input_ids"],
                             t["inputs.qformer_text_attention_mask"], output_hidden_states=True)
        if guided:
            merged, weights_bnp = model.merge_context(x, torch.ones(x.shape[:2], dtype=torch.bool))
            assert (merged - t["expected.merged_context"]).abs().max() <= 1e-5
            assert (weights_bnp[..., None] - t["expected.patch_weights_bnp"]).abs().max() <= 1e-6
    assert (out.query_output - t[f"expected.{variant}.query_output"]).abs().max() <= 1e-5
    assert (out.last_hidden_state - t[f"expected.{variant}.last_hidden_state"]).abs().max() <= 1e-5
    assert (out.visual_tokens.flatten(1, 2) - t[f"expected.{variant}.inputs_llm"]).abs().max() <= 1e-5


def test_save_load_round_trip_is_exact(tiny_backbone, tokenizers, tmp_path):
    model = make_model(tiny_backbone, tokenizers)
    with torch.no_grad():
        for p in model.trainable_state_dict().values():
            p.add_(torch.randn_like(p))
    path = save_trainable(model, tmp_path / "ckpt", config_yaml="model:\n  name: sam\n")
    saved = load_file(str(path))
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(v.numel() for v in saved.values()) < sum(p.numel() for p in model.parameters()) / 2
    fresh = make_model(tiny_backbone, tokenizers)
    load_trainable(fresh, tmp_path / "ckpt")
    for name, p in model.state_dict().items():
        assert torch.equal(p, fresh.state_dict()[name]), name
    batch = make_batch(tokenizers, [2, 1])
    with torch.no_grad():
        assert model(batch).loss.item() == fresh(batch).loss.item()
    assert (tmp_path / "ckpt" / "config.yaml").read_text().startswith("model:")
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


def test_adapter_from_another_variant_is_refused(tiny_backbone, tokenizers, tmp_path):
    save_trainable(make_model(tiny_backbone, tokenizers), tmp_path)
    with pytest.raises(CheckpointError, match="keys not in the model.*w_in"):
        load_trainable(make_model(tiny_backbone, tokenizers, guidance="none"), tmp_path)


def test_convert_script_writes_a_loadable_adapter_folder(tiny_backbone, tokenizers, tmp_path):
    import importlib.util

    import sam_mllm

    spec = importlib.util.spec_from_file_location("convert_lavis", Path(__file__).parents[1] / "scripts"
                                                  / "convert_lavis_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    full = _lavis_state_dict(make_model(tiny_backbone, tokenizers))
    # What the released SAM checkpoint holds: the trained parts and the Q-Former, no ViT or LLM.
    released = {k: v for k, v in full.items() if not k.startswith(("visual_encoder.", "ln_vision", "llm_model."))}
    torch.save({"model": released}, tmp_path / "sam.pth")
    out = tmp_path / "converted"
    script.main(["--src", str(tmp_path / "sam.pth"), "--out", str(out), "--dims", "tiny", "model.dims=tiny",
                 "model.dtype=float32"])
    pipe = sam_mllm.load_model(checkpoint=str(out))
    assert torch.equal(pipe.model.w_in.weight, released["Qformer.bert.encoder.one_2_muliple.0.weight"])
    assert torch.equal(pipe.model.patch_weight.weight, released["attn.weight"])
    assert torch.equal(pipe.model.qformer.encoder.layer[0].attention.attention.query.weight,
                       released["Qformer.bert.encoder.layer.0.attention.self.query.weight"])
    with pytest.raises(CheckpointError, match="shapes do not fit dims=7b"):
        script.main(["--src", str(tmp_path / "sam.pth"), "--out", str(tmp_path / "x"), "--dims", "7b"])

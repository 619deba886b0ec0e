"""SEA (sam_mllm/objectives): every equation against a reference written here, the Q-Former hook,
gradients, λ = 0, padded images, seeded labels, the oracle labeller, and training (resume, 2 processes)."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_batch, make_model
from safetensors.torch import load_file

from sam_mllm.config import load_config
from sam_mllm.evaluate import read_jsonl
from sam_mllm.objectives import sea as S
from sam_mllm.objectives.labellers import OracleLabeller, world_label_words
from sam_mllm.train import train

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ equations


def test_eq6_top_n_negated_cosine_and_non_positive_scores_dropped():
    g = torch.Generator().manual_seed(0)
    patches, words = torch.randn(5, 6, generator=g), torch.randn(9, 6, generator=g)
    patches[4] = words[0] * 3  # a patch whose negated cosines are all <= 0 except the opposite words
    for negate in (True, False):
        ids, scores = S.patch_labels(patches, words, top_n=4, negate=negate)
        for i in range(5):
            ref = []
            for j in range(9):
                c = float(patches[i] @ words[j] / (patches[i].norm() * words[j].norm()))
                ref.append((-c if negate else c, j))
            ref = sorted(ref, reverse=True)[:4]
            kept = [(s, j) for s, j in ref if s > 0]
            assert ids[i, : len(kept)].tolist() == [j for _, j in kept]
            assert torch.allclose(scores[i, : len(kept)], torch.tensor([s for s, _ in kept]), atol=1e-6)
            assert (ids[i, len(kept):] == -1).all() and (scores[i, len(kept):] == 0).all()
    ids, _ = S.patch_labels(patches[4:], words, top_n=9, negate=False)
    assert ids[0, 0] == 0  # +cos ranks the patch's own word first; -cos ranks it last (dropped, cos = 1)
    ids, _ = S.patch_labels(patches[4:], words, top_n=9, negate=True)
    assert 0 not in ids[0].tolist()
    # A patch orthogonal to every word has no positive score: no label at all.
    ids, scores = S.patch_labels(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0], [2.0, 0.0]]), 2)
    assert ids.tolist() == [[-1, -1]] and scores.sum() == 0


def test_eq7_normalisation_and_seeded_sampling():
    scores = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 6.0, 0.0]])
    norm = S.normalize_scores(scores)
    assert torch.allclose(norm[0], scores[0]) and norm[1].sum() == 0
    assert torch.allclose(norm[2], torch.tensor([0.25, 0.0, 0.75, 0.0]))
    # Inverse CDF: u in [0, 0.25) -> 0, [0.25, 1) -> 2; zero-probability columns are never drawn.
    picks = S.draw(norm[[2, 2, 2, 1]], np.array([0.0, 0.2499, 0.25, 0.5]))
    assert picks.tolist() == [0, 0, 2, -1]
    u = S.seeded_uniform(7, 3, np.arange(20000), 0)
    freq = torch.bincount(S.draw(norm[0].expand(20000, 4), u), minlength=4).float() / 20000
    assert torch.allclose(freq, norm[0], atol=0.015) and freq[3] == 0
    # Pure function of the keys: any batching gives the same uniform; other keys differ.
    single = [float(S.seeded_uniform(7, 3, i, 0)) for i in (0, 5, 19999)]
    assert single == [float(u[0]), float(u[5]), float(u[19999])]
    assert not np.array_equal(u, S.seeded_uniform(8, 3, np.arange(20000), 0))
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01


def test_window_sampling_and_deduplication():
    u = S.seeded_uniform(1, np.arange(16))
    picked = S.window_patches(torch.ones(16, dtype=torch.bool), 4, 2, u)
    assert len(picked) == 16 // 4
    windows = [((p // 4) // 2, (p % 4) // 2) for p in picked]
    assert sorted(windows) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # exactly one patch per 2x2 window
    labelled = torch.zeros(16, dtype=torch.bool)
    labelled[[5, 15]] = True
    assert S.window_patches(labelled, 4, 2, u) == [5, 15]  # unlabelled windows are skipped
    assert len(S.window_patches(torch.ones(25, dtype=torch.bool), 5, 2, S.seeded_uniform(1, np.arange(25)))) == 9
    with pytest.raises(ValueError, match="patch grid"):
        S.window_patches(torch.ones(15, dtype=torch.bool), 4, 2, u)
    labels, prio = [3, 1, 3, 2, 1, 3], [0.5, 0.9, 0.1, 0.4, 0.2, 0.7]
    keep = S.deduplicate(labels, prio)
    ref = sorted(min((p, i) for i, (lab, p) in enumerate(zip(labels, prio)) if lab == w)[1] for w in set(labels))
    assert keep == ref == [2, 3, 4]


def test_eq8_label_embedding_is_the_mean_of_sub_word_rows(tokenizers):
    emb = torch.randn(30, 8)
    ids, mask = torch.tensor([[3, 5, 7], [9, 0, 0]]), torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()
    out = S.label_embeddings(emb, ids, mask)
    assert torch.allclose(out[0], (emb[3] + emb[5] + emb[7]) / 3) and torch.equal(out[1], emb[9])
    llm, _ = tokenizers  # a multi-token "word" through the objective's own tokenisation
    obj = S.SEAObjective(["red star", "blue"], llm)
    assert obj.word_mask.sum(1).tolist() == [2, 1]
    rows = llm("red star", add_special_tokens=False).input_ids
    assert obj.word_ids[0, :2].tolist() == rows
    with pytest.raises(ValueError, match="cannot encode"):
        S.SEAObjective(["zebra"], llm)


def test_eq9_value_symmetry_and_limits():
    g = torch.Generator().manual_seed(1)
    x, t, tau = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g), 0.3

    def phi(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    ref = 0.0
    for i in range(6):
        ref += math.log(math.exp(phi(x[i], t[i]) / tau) / sum(math.exp(phi(x[i], t[j]) / tau) for j in range(6)))
        ref += math.log(math.exp(phi(t[i], x[i]) / tau) / sum(math.exp(phi(t[i], x[j]) / tau) for j in range(6)))
    ref = -ref / (2 * 6)
    assert abs(float(S.sea_loss(x, t, tau)) - ref) < 1e-5
    assert torch.allclose(S.sea_loss(x, t, tau), S.sea_loss(t, x, tau))  # symmetric in the two modalities
    perm = torch.randperm(6, generator=g)
    assert torch.allclose(S.sea_loss(x[perm], t[perm], tau), S.sea_loss(x, t, tau))  # order of pairs
    assert S.sea_loss(x, x, 0.01) < 1e-3  # aligned tokens, sharp temperature -> 0
    big = torch.nn.functional.normalize(torch.randn(256, 512, generator=g), dim=-1)
    assert abs(float(S.sea_loss(big, torch.randn(256, 512, generator=g), 1.0)) - math.log(256)) < 0.05


# ------------------------------------------------------------------------ Q-Former attribution


def test_hook_reproduces_eager_cross_attention_and_works_under_sdpa(tiny_backbone, tokenizers):
    batch = make_batch(tokenizers, [2, 1, 3])
    model = make_model(tiny_backbone, tokenizers, guidance="none")  # the tiny backbone is eager
    mask = batch["image_mask"]
    embeds = model.encode_images(batch["pixel_values"], mask)
    b_idx, n_idx = mask.nonzero(as_tuple=True)
    nq = model.num_query_tokens
    text = batch["qformer_attention_mask"][b_idx]
    kwargs = dict(input_ids=batch["qformer_input_ids"][b_idx], query_embeds=model.query_tokens.expand(len(b_idx), -1, -1),
                  attention_mask=torch.cat([text.new_ones(len(b_idx), nq), text], 1),
                  encoder_hidden_states=embeds[b_idx, n_idx])
    with torch.no_grad(), S.cross_attention_probs(model.qformer) as maps:
        eager = model.qformer(**kwargs, output_attentions=True).cross_attentions
    assert len(maps) == len(eager) == 2
    for ours, ref in zip(maps, eager):
        assert (ours - ref).abs().max() <= 1e-6
    sdpa = copy.deepcopy(model)
    sdpa.qformer.config._attn_implementation = "sdpa"
    with torch.no_grad(), S.cross_attention_probs(sdpa.qformer) as maps_sdpa:
        sdpa.qformer(**kwargs)
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(maps_sdpa, eager))
    a = S.query_attribution(model, embeds, mask, batch["qformer_input_ids"], batch["qformer_attention_mask"])
    assert a.shape == (int(mask.sum()), nq, embeds.shape[2] - 1)
    assert torch.allclose(a.sum(-1), torch.ones(a.shape[:2]), atol=1e-6)
    ref = torch.stack([m[..., 1:] for m in eager]).mean((0, 2))
    assert torch.allclose(a, ref / ref.sum(-1, keepdim=True), atol=1e-6)
    # Mixing: pi_q = sum_j a_q[j] S_norm_j, checked against a dense reference.
    ids = torch.tensor([[0, 4], [4, -1], [2, 0], [-1, -1]])
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.9, 0.1], [0.0, 0.0]])
    att = torch.softmax(torch.randn(3, 4), -1)
    words, mix = S.mix_labels(att, ids, probs)
    dense = torch.zeros(4, 5)
    for j in range(4):
        for k in range(2):
            if ids[j, k] >= 0:
                dense[j, ids[j, k]] += probs[j, k]
    assert words.tolist() == [0, 2, 4] and torch.allclose(mix, (att @ dense)[:, [0, 2, 4]])


def _labels(batch: dict, patches: int, words: int, seed: int = 0, top_n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b, n = batch["image_mask"].shape
    ids = torch.stack([torch.randperm(words, generator=g)[:top_n] for _ in range(b * n * patches)])
    scores = S.normalize_scores(torch.rand(b * n * patches, top_n, generator=g))
    return torch.stack([ids.float(), scores], -1).view(b, n, patches, top_n, 2)


WORDS = ["red", "blue", "green", "star", "circle", "square"]


@pytest.mark.parametrize("variant", [dict(guidance="w_former"), dict(guidance="none", perceiver="mlp")])
def test_lambda_zero_is_bit_identical_and_only_trainable_groups_and_tau_get_gradients(tiny_backbone, tokenizers,
                                                                                       variant):
    batch = make_batch(tokenizers, [2, 1, 3])
    batch["patch_labels"] = _labels(batch, 16, len(WORDS))
    ids = ["a", "b", "c"]

    def run(weight: float | None):
        torch.manual_seed(0)
        model = make_model(tiny_backbone, tokenizers, **variant).train()
        obj = S.SEAObjective(WORDS, tokenizers[0], seed=0)
        out = model(batch)
        loss = out.loss
        if weight is not None:
            res = obj(model, batch, out.perception, ids, step=3)
            assert res.num_pairs >= 2
            loss = loss + weight * res.loss
        loss.backward()
        return model, obj, loss

    base, _, loss0 = run(None)
    zero, obj0, loss_zero = run(0.0)
    assert torch.equal(loss0, loss_zero)
    for (name, p), q in zip(base.named_parameters(), zero.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        assert p.grad is None or torch.equal(p.grad, q.grad), name
    assert obj0.log_tau.grad == 0
    one, obj1, _ = run(1.0)
    # (W_in / patch weights get exact zeros at init: W_out is zero-initialised; they still get a gradient.)
    got = {n for n, p in one.named_parameters() if p.grad is not None}
    assert got == {n for n, p in one.named_parameters() if p.requires_grad} and got
    assert obj1.log_tau.grad != 0
    assert any(not torch.equal(p.grad, q.grad) for p, q in zip(zero.parameters(), one.parameters()) if p.grad is not None)
    # SEA adds nothing to the model: generation reads the same parameters with or without it.
    assert set(one.state_dict()) == set(base.state_dict())


@pytest.mark.parametrize("variant", [dict(guidance="w_former"), dict(guidance="none", perceiver="mlp")])
def test_padded_images_never_give_labels_and_draws_do_not_depend_on_the_batch(tiny_backbone, tokenizers, variant):
    model = make_model(tiny_backbone, tokenizers, **variant)
    batch = make_batch(tokenizers, [2, 1, 3])
    labels = _labels(batch, 16, len(WORDS) - 1)
    labels[~batch["image_mask"]] = torch.tensor([len(WORDS) - 1.0, 1.0])  # padded slots: a poisoned word
    batch["patch_labels"] = labels
    obj = S.SEAObjective(WORDS, tokenizers[0], seed=5)
    with torch.no_grad():
        out = model(batch)
        tokens, words = obj.pairs(model, batch, out.perception, ["a", "b", "c"], step=7)
        assert len(words) >= 2 and len(WORDS) - 1 not in words.tolist()
        assert len(set(words.tolist())) == len(words)  # de-duplicated
        again = obj.pairs(model, batch, out.perception, ["a", "b", "c"], step=7)
        assert torch.equal(again[1], words) and torch.equal(again[0], tokens)  # a resumed run draws the same
        other = obj.pairs(model, batch, out.perception, ["a", "b", "c"], step=8)
        # Sample "b" alone draws exactly what it draws inside the batch, before de-duplication.
        alone = {k: v[1:2, :1] if k in ("image_mask", "patch_labels", "pixel_values") else v[1:2]
                 for k, v in batch.items()}
        solo = obj.draw_labels(model, alone, model(alone).perception, ["b"], step=7)
        in_batch = [d for d in obj.draw_labels(model, batch, out.perception, ["a", "b", "c"], step=7) if d[0] == 1]
        obj.seed = 6
        reseeded = obj.pairs(model, batch, out.perception, ["a", "b", "c"], step=7)
    assert len(solo) >= 2 and [d[1:] for d in solo] == [d[1:] for d in in_batch]
    assert not (torch.equal(other[1], words) and torch.equal(reseeded[1], words))


def test_mlp_variant_one_token_per_patch(tiny_backbone, tokenizers):
    model = make_model(tiny_backbone, tokenizers, guidance="none", perceiver="mlp")
    batch = make_batch(tokenizers, [2, 1])
    with torch.no_grad():
        out = model(batch)
        assert out.perception.visual_tokens.shape == (2, 2, 16, model.config.text_config.hidden_size)
        assert out.perception.visual_tokens[1, 1].abs().sum() == 0  # padded slot
        assert isinstance(model.generate(batch, max_new_tokens=3, num_beams=1), list)
    assert model.trainable == ["mlp_projector"]
    with pytest.raises(ValueError, match="guidance must be 'none'"):
        make_model(tiny_backbone, tokenizers, guidance="w_former", perceiver="mlp")


# ------------------------------------------------------------------------------- oracle labeller


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from sam_mllm.data.synthetic import generate

    root = tmp_path_factory.mktemp("seaworld")
    zero = {"train": 0, "val": 0, "test": 0}
    generate(root, seed=1, sizes={"mmlink": {"train": 8, "val": 0, "test": 0}, "group_captioning": zero,
                                  "storytelling": zero, "change_captioning": zero}, datasets=["mmlink"], workers=1)
    return root / "mmlink" / "train"


def test_oracle_labels_follow_the_recorded_objects(world):
    import json

    scenes = json.loads((world / "scenes.json").read_text())
    lab = OracleLabeller(grid=8, top_n=10)
    rel = "images/mmlink-train-00000_0.png"
    out = lab([world / rel])[0]  # [64, 10, 2]
    scene = scenes["scenes"][rel]
    words = world_label_words()
    shape, colour, _ = scene["objects"][-1]["obj"]  # drawn last: nothing hides it
    p = scene["objects"][-1]
    cx, cy = ((p["x"] + p["d"] / 2) * 8 // scenes["image_size"], (p["y"] + p["d"] / 2) * 8 // scenes["image_size"])
    centre = out[int(cy) * 8 + int(cx)]
    assert {shape, colour} <= {words[int(i)] for i in centre[:, 0] if i >= 0}
    corner_words = [{words[int(i)] for i in out[k, :, 0] if i >= 0} for k in range(64)]
    assert sum(c == {scene["context"]} for c in corner_words) >= 8  # pure background patches
    assert torch.allclose(out[..., 1].sum(-1), torch.ones(64))  # S_norm per patch
    with pytest.raises(ValueError, match="no scene"):
        lab([world / "images" / "nope.png"])


def test_label_cache_is_keyed_by_image_mode_and_says_label_cache(world, tmp_path, capsys):
    from sam_mllm.data.processing import ImageTransform
    from sam_mllm.objectives.labellers import build_label_cache

    files, transform = sorted((world / "images").glob("*.png"))[:2], ImageTransform(64)
    released, added = build_label_cache(tmp_path, OracleLabeller(8, 3), transform, files)
    assert added == 2 and "label cache" in capsys.readouterr().err
    upright, added = build_label_cache(tmp_path, OracleLabeller(8, 3, image_mode="upright"), transform, files)
    assert added == 2 and upright.dir != released.dir  # other decoding, other entry
    again, added = build_label_cache(tmp_path, OracleLabeller(8, 3), transform, files)
    assert added == 0 and again.dir == released.dir


# --------------------------------------------------------------------------------------- training


def _overrides(world: Path, out: Path, extra=()) -> list[str]:
    return ["model.dims=tiny", f"data_root={world.parent}", f"output_dir={out}",
            f"train.datasets=[{{name: w, task: group_captioning, path: {world.name}}}]",
            "train.lr=1e-3", "train.warmup_steps=2", "train.global_batch_size=4", "train.micro_batch_size=2",
            "train.log_every=1", "train.save_every=2", "train.augment=none", "model.max_images=2",
            "sea.enabled=true", f"sea.label_cache={out.parent / 'labels'}", *extra]


def test_training_logs_parts_resumes_identically_and_two_processes_match(world, tmp_path):
    run = tmp_path / "run"
    train(load_config(None, _overrides(world, run, ["train.max_steps=4"])))
    log = [r for r in read_jsonl(run / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for r in log:
        assert abs(r["loss"] - (r["loss_ce"] + r["loss_sea"])) < 1e-4 and r["sea_pairs"] >= 2 and r["tau"] > 0
    # Kill after step 2 (drop the later checkpoints) and resume: same labels, same weights, same τ.
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")
    train(load_config(None, _overrides(world, resumed, ["train.max_steps=4", "train.resume=latest"])))
    log2 = [r for r in read_jsonl(resumed / "log.jsonl") if "loss" in r]
    for a, b in zip(log[2:], log2[2:]):
        assert (a["sea_pairs"], a["loss_sea"], a["tau"]) == (b["sea_pairs"], b["loss_sea"], b["tau"])
    sa = torch.load(run / "checkpoints" / "step_0000004" / "state.pt", weights_only=False)["sea"]
    sb = torch.load(resumed / "checkpoints" / "step_0000004" / "state.pt", weights_only=False)["sea"]
    assert torch.equal(sa["log_tau"], sb["log_tau"]) and sa["log_tau"] != 0
    a, b = load_file(str(run / "final" / "adapter.safetensors")), load_file(str(resumed / "final" / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Two processes (one micro-batch each) equal one process accumulating the same two micro-batches.
    ddp = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "-m", "sam_mllm.train", *_overrides(world, ddp, ["train.max_steps=4"])],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = load_file(str(ddp / "final" / "adapter.safetensors"))
    assert all(torch.allclose(a[k], c[k], atol=1e-5) for k in a)
    logd = [r for r in read_jsonl(ddp / "log.jsonl") if "loss" in r]
    assert all(abs(x["loss_sea"] - y["loss_sea"]) < 1e-4 and x["sea_pairs"] == y["sea_pairs"] for x, y in zip(log, logd))
    sd = torch.load(ddp / "checkpoints" / "step_0000004" / "state.pt", weights_only=False)["sea"]
    assert torch.allclose(sd["log_tau"], sa["log_tau"], atol=1e-6)


def test_non_finite_tau_gradient_stops_before_the_step(world, tmp_path, monkeypatch):
    """τ lives outside the model: its gradient is checked with the model's before the optimizer step."""
    from sam_mllm.train import TrainingError

    real = S.SEAObjective.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # step 2 (two micro-batches per step): finite loss, NaN gradient of log τ

            class NaNGrad(torch.autograd.Function):
                @staticmethod
                def forward(ctx, x):
                    return x.new_zeros(())

                @staticmethod
                def backward(ctx, grad):
                    return torch.full((), float("nan"))

            out.loss = out.loss + NaNGrad.apply(self.log_tau)
        return out

    monkeypatch.setattr(S.SEAObjective, "forward", forward)
    run = tmp_path / "nan_tau"
    with pytest.raises(TrainingError, match=r"non-finite gradients \(sea\.log_tau\) at step 2 .*step_0000001"):
        train(load_config(None, _overrides(world, run, ["train.max_steps=3", "train.save_every=1"])))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000001"]


def test_sea_needs_the_deterministic_transform(world, tmp_path):
    from sam_mllm.config import ConfigError

    with pytest.raises(ConfigError, match="train.augment=none"):
        train(load_config(None, _overrides(world, tmp_path / "x", ["train.max_steps=1",
                                                                    "train.augment=random_resized_crop"])))


# ------------------------------------------------------------------- CLIP labeller, diagnostics


def _tiny_clip(path: Path, words: list[str], image_size: int = 32, patch: int = 8) -> None:
    from transformers import CLIPConfig, CLIPModel

    from sam_mllm.models.tokenizers import build_word_tokenizers

    _, tok = build_word_tokenizers(words)  # [CLS] w [SEP]: CLIP pools at the first [SEP] (id 3)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16, eos_token_id=3,
                                      pad_token_id=0, bos_token_id=2),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=image_size, patch_size=patch), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def test_clip_labeller_is_eqs_4_to_6_on_the_backbone_grid(tmp_path, monkeypatch):
    from PIL import Image

    from sam_mllm.objectives.labellers import CLIPLabeller, LabellerError

    words = ["red", "blue", "green", "star", "circle"]
    _tiny_clip(tmp_path / "clip", words)
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3)).astype(np.uint8)).save(img)
    lab = CLIPLabeller(str(tmp_path / "clip"), words, grid=4, top_n=3)
    out = lab([img])
    assert out.shape == (1, 16, 3, 2)
    m = lab.model
    pixels = lab.transform(Image.open(img))[None]
    with torch.no_grad():
        vis = m.visual_projection(m.vision_model.post_layernorm(m.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]))
        enc = lab.model.config  # text features word by word, one at a time (no padding)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tmp_path / "clip")
        text = torch.cat([m.text_projection(m.text_model(**tok([w], return_tensors="pt")).pooler_output) for w in words])
    assert enc.text_config.eos_token_id == 3
    ids, scores = S.patch_labels(vis[0], text, 3, negate=True)
    assert torch.equal(out[0, ..., 0].long(), ids) and torch.allclose(out[0, ..., 1], S.normalize_scores(scores), atol=1e-5)
    with pytest.raises(LabellerError, match="patch grid is 4x4"):
        CLIPLabeller(str(tmp_path / "clip"), words, grid=16)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LabellerError, match="not found in the Hugging Face cache.*HF_HUB_OFFLINE"):
        CLIPLabeller("nobody/no-such-clip", words, grid=4)


def test_label_precision_on_a_hand_built_case():
    from sam_mllm.objectives.labellers import label_precision

    # 1 image, 3 patches, 3 words; labels best first (-1 = none), oracle coverage > 0 = present.
    ids = torch.tensor([[[0, 2], [1, -1], [-1, -1]]])
    coverage = torch.tensor([[[0.7, 0.3, 0.0], [0.0, 0.0, 1.0], [0.0, 0.5, 0.5]]])
    r = label_precision(ids, coverage, ks=(1, 2))
    assert r["precision@1"] == pytest.approx(1 / 2)  # patch 0 right, patch 1 wrong, patch 2 unlabelled
    assert r["precision@2"] == pytest.approx(1 / 3)  # 1 hit of 3 emitted labels
    assert r["labelled"] == pytest.approx(2 / 3) and r["patches"] == 3
    assert r["chance"] == pytest.approx((2 / 3 + 1 / 3 + 2 / 3) / 3)
    assert r["ceiling@1"] == 1.0 and r["ceiling@2"] == pytest.approx((1 + 0.5 + 1) / 3)
    only_second = label_precision(ids, coverage, ks=(1,), patches=torch.tensor([[False, True, False]]))
    assert only_second["precision@1"] == 0.0 and only_second["patches"] == 1


def test_committed_tiny_clip_loads_on_the_backbone_grid_and_beats_chance(world, monkeypatch):
    """The committed asset through the config path (repo-relative, from any directory): its grid is
    the tiny backbone's, labels have the cached layout, and its patch labels beat chance on fresh images."""
    from sam_mllm.config import SEAConfig
    from sam_mllm.models.backbone import TINY_BACKBONE
    from sam_mllm.objectives.labellers import build_labeller, measure_label_precision, saved_patch_grid

    grid = saved_patch_grid(TINY_BACKBONE)
    monkeypatch.chdir(world)  # configs name the asset repo-relative; it must resolve from anywhere
    cfg = SEAConfig(labeller="clip", clip_model="sam_mllm/assets/tiny_clip", top_n=5, negate_similarity=False)
    lab = build_labeller(cfg, grid)
    files = sorted((world / "images").glob("*.png"))  # 16 images of 2-4 objects, seed 1: never trained on
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REPO / "sam_mllm" / "assets" / "tiny_clip")
    assert tok("red striped")["input_ids"][-1] == tok.eos_token_id == lab.model.config.text_config.eos_token_id != 2
    out = lab(files[:2])
    assert out.shape == (2, grid * grid, 5, 2)
    ids, s_norm = out[..., 0], out[..., 1]
    assert ((ids >= -1) & (ids < len(lab.words)) & (ids == ids.round())).all()
    assert torch.allclose(s_norm.sum(-1)[ids[..., 0] >= 0], torch.ones(()), atol=1e-5) and (s_norm >= 0).all()
    r = measure_label_precision(lab, OracleLabeller(grid, 5), files, ks=(1,))["all"]
    assert r["precision@1"] > 3 * r["chance"], r  # a random CLIP scores about the chance level


def test_recalled_words_reach_predictions_and_report(tmp_path, world):
    from sam_mllm.evaluate import evaluate

    cfg = load_config(None, ["model.dims=tiny", "model.name=llava_mlp", f"data_root={world.parent}",
                             f"output_dir={tmp_path}", "eval.recalled_words=true", "generation.max_new_tokens=2",
                             "generation.num_beams=1", "model.max_images=2",
                             f"eval.datasets=[{{name: w, task: group_captioning, path: {world.name}}}]"])
    evaluate(cfg, out_dir=tmp_path)
    preds = read_jsonl(tmp_path / "w" / "predictions.jsonl")
    assert all(len(p["recalled_words"]) == 2 and "×" in p["recalled_words"][0] for p in preds)
    assert "recalled words" in (tmp_path / "w" / "report.html").read_text()


def test_recalled_word_accuracy_counts_labelled_tokens_of_present_images(tiny_backbone, tokenizers):
    model = make_model(tiny_backbone, tokenizers, guidance="none", perceiver="mlp")
    batch = make_batch(tokenizers, [2, 1])
    labels = _labels(batch, 16, len(WORDS))
    labels[0, 0, :5] = torch.tensor([-1.0, 0.0])  # five unlabelled patches
    batch["patch_labels"] = labels
    obj = S.SEAObjective(WORDS, tokenizers[0])
    hits, total = S.recalled_word_accuracy(model, batch, obj)
    assert total == 3 * 16 - 5 and 0 <= hits <= total
    # Tokens made equal to their top label's embedding are all recalled.
    emb = S.label_embeddings(model.language_model.get_input_embeddings().weight, obj.word_ids, obj.word_mask)
    top = labels[..., 0].long().gather(-1, labels[..., 1].argmax(-1, keepdim=True)).squeeze(-1)
    from sam_mllm.models.sam import Perception

    fake = Perception(query_output=None, visual_tokens=emb[top.clamp(min=0)])
    model._visual_tokens = lambda b: fake
    assert S.recalled_word_accuracy(model, batch, obj) == (total, total)

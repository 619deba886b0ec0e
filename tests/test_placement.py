"""model.image_placement: visual tokens before the prompt (prefix) or at the prompt's image markers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model, write_dataset

from sam_mllm.config import ConfigError, ModelConfig, load_config
from sam_mllm.data.placement import MarkerError, split_at_markers, strip_markers, tokenize_at_markers
from sam_mllm.data.processing import Processor


def test_markers_are_parsed_and_checked_against_the_images():
    assert split_at_markers("A{image#2}B{image#1}C", 2, 0) == (["A", "B", "C"], [1, 0])
    assert split_at_markers("<image> x <image>", 2, 0) == (["", " x ", ""], [0, 1])
    assert strip_markers("{image#1}Caption#1: a dog.{image#2}Caption#2:") == "Caption#1: a dog. Caption#2:"
    with pytest.raises(MarkerError, match=r"sample id 'v7'.*3 image\(s\), but the prompt has 2 marker"):
        split_at_markers("{image#1}{image#2} what?", 3, "v7")
    with pytest.raises(MarkerError, match=r"sample id 5.*each once"):
        split_at_markers("{image#1}{image#1}", 2, 5)
    with pytest.raises(MarkerError, match="mixes"):
        split_at_markers("{image#1}<image>", 2, 5)
    with pytest.raises(MarkerError, match=r"0 marker.*model.image_placement=prefix"):
        split_at_markers("no markers here", 1, 5)


def test_truncation_drops_text_from_the_left_never_a_marker(tokenizers):
    llm, _ = tokenizers
    ids, slots = tokenize_at_markers(llm, "a red star {image#1} the blue circle {image#2} what ?", 2, 0, 6)
    # BOS, image 1, "circle", image 2, "what", "?": "a red star the blue" went, both markers stayed.
    assert slots == [-1, 0, -1, 1, -1, -1]
    word = {w: llm(w, add_special_tokens=False).input_ids[0] for w in ("circle", "what", "?")}
    assert ids[0] == llm.bos_token_id and [ids[2], ids[4], ids[5]] == [word["circle"], word["what"], word["?"]]


def _items(specs, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"id": i, "images": torch.randn(n, 3, 32, 32, generator=g), "instruction": prompt, "output": answer}
            for i, (n, prompt, answer) in enumerate(specs)]


def _processors(tokenizers):
    llm, qf = tokenizers
    # llm_bos="<s>": the word tokenizer's own BOS, which the markers layout keeps from its template.
    return (Processor(qf, llm, 32, image_placement="prefix", llm_bos="<s>"),
            Processor(qf, llm, 32, image_placement="markers", llm_bos="<s>"))


def test_layouts_explicitly(tiny_backbone, tokenizers):
    llm, _ = tokenizers
    model = make_model(tiny_backbone, tokenizers)
    prefix, markers = _processors(tokenizers)
    embed = model.language_model.get_input_embeddings()

    def layout(proc, prompt):
        batch = proc.collate(_items([(2, prompt, "a red star .")]), with_answers=True)
        vis = model._visual_tokens(batch).visual_tokens[0]  # [2, nq, D]
        embeds, mask, pos, labels = model._assemble(vis[None], batch["image_mask"], batch["input_ids"],
                                                     batch["attention_mask"], batch["labels"],
                                                     image_slots=batch.get("image_slots"))
        return embeds[0], pos[0], labels[0], vis, batch

    def words(text):
        return embed(torch.tensor(llm(text, add_special_tokens=False).input_ids))

    bos = embed(torch.tensor([llm.bos_token_id]))
    answer = words("a red star .")
    eos = embed(torch.tensor([llm.eos_token_id]))
    # Markers at the end of the prompt, in order: [BOS, text, image 1, image 2, answer].
    got, pos, labels, vis, batch = layout(markers, "what is the shared object ? {image#1}{image#2}")
    want = torch.cat([bos, words("what is the shared object ?"), vis[0], vis[1], answer, eos])
    assert torch.equal(got, want) and torch.equal(pos, torch.arange(len(want)))
    nq = vis.shape[1]
    assert (labels[: 1 + 6 + 2 * nq] == -100).all() and (labels[1 + 6 + 2 * nq :] >= 0).all()
    # The Q-Former reads the prompt without its markers.
    assert torch.equal(batch["qformer_input_ids"], tokenizers[1](["what is the shared object ?"],
                                                                   return_tensors="pt").input_ids)
    # Interleaved and reordered: [BOS, "a", image 2, "the", image 1, "what ?"].
    got, _, _, vis, _ = layout(markers, "a {image#2} the {image#1} what ?")
    want = torch.cat([bos, words("a"), vis[1], words("the"), vis[0], words("what ?"), answer, eos])
    assert torch.equal(got, want)
    # Prefix, the released layout: [image 1, image 2, BOS, text]; markers stay literal text.
    got, _, _, vis, _ = layout(prefix, "what is the shared object ?")
    want = torch.cat([vis[0], vis[1], bos, words("what is the shared object ?"), answer, eos])
    assert torch.equal(got, want)
    # Markers at the start are NOT prefix: the tokenizer's BOS stays first.
    got, *_ = layout(markers, "{image#1}{image#2}what is the shared object ?")
    assert not torch.equal(got, want)
    assert torch.equal(got, torch.cat([bos, vis[0], vis[1], words("what is the shared object ?"), answer, eos]))


def test_markers_equal_prefix_where_the_layouts_coincide(tiny_backbone, tokenizers):
    # Without a BOS token, images-then-text is both layouts: the model computes the same thing.
    model = make_model(tiny_backbone, tokenizers)
    llm, _ = tokenizers
    prefix, markers = _processors(tokenizers)
    items = _items([(2, "{image#1}{image#2}what is in the image ?", "a red star ."),
                    (3, "<image><image><image>what is the shared object ?", "the blue circle .")])
    a = markers.collate(items, with_answers=True)
    b = prefix.collate([{**it, "instruction": strip_markers(it["instruction"])} for it in items], with_answers=True)
    # Drop BOS from both: prefix rows start with it; marker rows have it before the placeholders.
    for batch in (a, b):
        keep = batch["input_ids"] != llm.bos_token_id
        for k in ("input_ids", "attention_mask", "labels", "image_slots"):
            if k in batch:
                fill = {"input_ids": llm.pad_token_id, "attention_mask": 0, "labels": -100, "image_slots": -1}[k]
                batch[k] = torch.stack([torch.cat([row[m], row.new_full(((~m).sum(),), fill)])
                                        for row, m in zip(batch[k], keep)])
    out_a, out_b = model(a), model(b)
    assert torch.equal(out_a.loss, out_b.loss)
    nq = model.num_query_tokens
    for i in range(2):  # every real position (left padding differs: zeros here, pad embeddings there)
        n = int(b["image_mask"][i].sum()) * nq + int(b["attention_mask"][i].sum())
        assert torch.equal(out_a.logits[i, -n:], out_b.logits[i, -n:])


def test_batch_with_different_marker_positions_equals_samples_alone(tiny_backbone, tokenizers):
    model = make_model(tiny_backbone, tokenizers)
    with torch.no_grad():  # non-zero guidance, so SAM's W-former takes part
        model.w_out.weight.normal_(std=0.1)
        model.w_in.weight.normal_(std=0.1)
    _, markers = _processors(tokenizers)
    items = _items([(2, "{image#1} what is in the image ? {image#2}", "a red star ."),
                    (3, "<image> a <image> the <image> shared object ?", "the blue circle ."),
                    (1, "what is the shared object ? {image#1}", "a green square is in the image .")])
    batch = markers.collate(items, with_answers=True)
    logits = model(batch).logits
    texts = model.generate(batch, num_beams=2, max_new_tokens=4)
    for i, it in enumerate(items):
        alone = markers.collate([it], with_answers=True)
        ref = model(alone).logits[0]
        assert torch.allclose(logits[i, -len(ref):], ref, atol=1e-5), i
        assert model.generate(alone, num_beams=2, max_new_tokens=4) == [texts[i]]


def test_markers_in_the_notebook_api_and_config(tiny_backbone, tokenizers, tmp_path):
    from PIL import Image

    from sam_mllm.api import Pipeline
    from sam_mllm.models import build_model

    with pytest.raises(ConfigError, match="image_placement"):
        load_config(None, ["model.image_placement=inline"])
    cfg = load_config(None, ["model.dims=tiny", "model.image_placement=markers", "generation.max_new_tokens=4",
                             "generation.num_beams=1"])
    pipe = Pipeline(build_model(cfg.model), cfg)
    assert pipe.processor.image_placement == "markers"
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    assert isinstance(pipe.generate(images, "{image#2} and {image#1} : what is shared ?"), str)
    with pytest.raises(MarkerError, match="2 image"):
        pipe.generate(images, "what is shared ?")
    assert ModelConfig().image_placement == "prefix"


def test_markers_in_training_and_evaluation(tmp_path):
    from sam_mllm.evaluate import evaluate
    from sam_mllm.train import train

    data = tmp_path / "tiny"
    samples = write_dataset(data, n=4)
    over = ["model.dims=tiny", "model.image_placement=markers", f"data_root={tmp_path}",
            f"output_dir={tmp_path / 'run'}", "train.datasets=[{name: tiny, task: group_captioning, path: tiny}]",
            "train.max_steps=2", "train.global_batch_size=2", "train.micro_batch_size=2", "train.warmup_steps=1",
            "eval.datasets=[{name: tiny, task: group_captioning, path: tiny}]", "generation.max_new_tokens=3",
            "generation.num_beams=1"]
    for s in samples:
        s["instruction"] = "".join(f"{{image#{k + 1}}}" for k in range(len(s["img_list"]))) + s["instruction"]
    (data / "annotations.json").write_text(json.dumps(samples))
    final = train(load_config(None, over))
    results = evaluate(load_config(None, [*over, f"model.checkpoint={final}"]), out_dir=tmp_path / "eval")
    assert results["tiny"]["num_samples"] == 4

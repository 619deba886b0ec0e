"""Evaluation semantics of the released code: prompt, length, BOS (issue: paper-exact evaluation).

``fixtures/released_generation`` is a replay of the released SAM ``generate`` under its own
transformers 4.33.2 on the embedded tiny backbone (scripts/replay_released_generation.py); our
``sam_mllm.evaluate`` output must equal it string for string.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sam_mllm.config import load_config
from sam_mllm.data.processing import Processor, PromptTooLongError
from sam_mllm.evaluate import evaluate, read_jsonl
from sam_mllm.models.tokenizers import build_word_tokenizers
from tests.conftest import WORDS, make_model

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "released_generation"
BACKBONE = REPO / "sam_mllm" / "assets" / "tiny_backbone"


def _replay_script():
    spec = importlib.util.spec_from_file_location("replay_released_generation",
                                                  REPO / "scripts" / "replay_released_generation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_equals_the_released_code_replayed_under_transformers_4_33(tmp_path):
    expected = json.loads((FIXTURE / "expected.json").read_text())
    assert expected["environment"]["transformers"] == "4.33.2"
    results = expected["results"]
    # The fixture covers what it must: prompts past 128 tokens and empty released answers.
    assert any(r["prompt_tokens"] > 128 for r in results)
    assert any(r["prediction"] == "" for r in results) and any(r["prediction"] for r in results)

    script = _replay_script()
    assert json.loads((FIXTURE / "cases.json").read_text()) == script.CASES
    script.write_dataset(tmp_path / "data" / "cases")
    cfg = load_config(None, [
        "model.name=instructblip", f"model.backbone={BACKBONE}", f"data_root={tmp_path / 'data'}",
        f"output_dir={tmp_path / 'run'}", "eval.batch_size=4", "eval.html_report=false",
        "eval.datasets=[{name: cases, task: group_captioning, path: cases}]",
    ])
    evaluate(cfg)
    predictions = {r["id"]: r["prediction"] for r in read_jsonl(tmp_path / "run" / "cases" / "predictions.jsonl")}
    assert [predictions[r["id"]] for r in results] == [r["prediction"] for r in results]


def test_fixture_inputs_are_what_our_perception_computes():
    """The replay ran on our visual tokens; they must still be what the model computes."""
    from sam_mllm.models import build_model

    script = _replay_script()
    cfg = load_config(None, ["model.name=instructblip", f"model.backbone={BACKBONE}"])
    model = build_model(cfg.model)
    processor = Processor.for_model(model, cfg.model)
    visual = load_file(FIXTURE / "visual_tokens.safetensors")
    transform = processor.transform(train=False)
    for i in (0, 6):
        images = torch.stack([transform(im) for im in script.case_images(i, script.CASES[i]["images"])])
        batch = processor.collate([{"id": i, "images": images, "instruction": script.CASES[i]["instruction"],
                                    "output": ""}], with_answers=False)
        with torch.no_grad():
            tokens = model._visual_tokens(batch).visual_tokens[0].flatten(0, 1)
        torch.testing.assert_close(tokens, visual[f"case{i}"], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- one semantic each


def _processor(tokenizers, **options) -> Processor:
    llm, qf = tokenizers
    return Processor(qf, llm, image_size=32, **options)


def _item(instruction: str, n: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"id": f"s{seed}", "images": torch.randn(n, 3, 32, 32, generator=g), "instruction": instruction,
            "output": "a red star ."}


LONG = " ".join(["what is the shared object in the image ?"] * 4)  # 36 word tokens


def test_eval_prompt_longer_than_max_prompt_tokens_is_generated_from_in_full(tiny_backbone, tokenizers):
    llm, qf = tokenizers
    processor = _processor(tokenizers, max_prompt_tokens=8)
    batch = processor.collate([_item(LONG)], with_answers=False)
    full = [llm.convert_tokens_to_ids("</s>")] + llm(LONG, add_special_tokens=False).input_ids
    assert batch["input_ids"][0].tolist() == full  # not cut to 8
    # Training still cuts from the left to max_prompt_tokens, keeping the BOS.
    train = processor.collate([_item(LONG)], with_answers=True)
    prompt = train["input_ids"][0][train["labels"][0] == -100].tolist()
    assert len(prompt) == 8 and prompt == full[:1] + full[-7:]
    # Generation from the collated batch equals generation from the same sample built by hand.
    model = make_model(tiny_backbone, tokenizers)
    manual = dict(batch, input_ids=torch.tensor([full]), attention_mask=torch.ones(1, len(full), dtype=torch.long))
    kw = dict(max_new_tokens=5, num_beams=2)
    assert torch.equal(model.generate(batch, return_ids=True, **kw), model.generate(manual, return_ids=True, **kw))


def test_eval_prompt_past_the_llm_context_names_the_sample_unless_truncation_is_chosen(tokenizers):
    processor = _processor(tokenizers, max_prompt_tokens=8, llm_context=40, visual_tokens_per_image=8)
    with pytest.raises(PromptTooLongError, match=r"sample id 's3'.*37 LLM tokens.*16 visual.*context of 40.*"
                                                 r"model.truncate_eval_prompts=true"):
        processor.collate([_item("a red star .", seed=1), _item(LONG, seed=3)], with_answers=False)
    cut = _processor(tokenizers, max_prompt_tokens=8, llm_context=40, visual_tokens_per_image=8, truncate_eval_prompts=True)
    assert cut.collate([_item(LONG, seed=3)], with_answers=False)["input_ids"].shape[1] == 8


def test_configured_bos_comes_first_whatever_the_tokenizer_template_inserts(tokenizers):
    llm, _ = tokenizers
    assert llm("a red star").input_ids[0] == llm.convert_tokens_to_ids("<s>")  # the template's BOS
    eos_bos = _processor(tokenizers)  # default: the released "</s>"
    ids = eos_bos.tokenize_prompt("a red star")
    assert ids[0] == llm.convert_tokens_to_ids("</s>") and llm.convert_tokens_to_ids("<s>") not in ids
    assert eos_bos.tokenize_prompt(LONG, truncate=True)[0] == ids[0]  # truncation never drops it
    assert _processor(tokenizers, llm_bos="<s>").tokenize_prompt("a red star") == llm("a red star").input_ids
    with pytest.raises(ValueError, match=r"model.llm_bos='<bos>' is not a token of the LLM tokenizer"):
        _processor(tokenizers, llm_bos="<bos>")
    assert load_config(None, []).model.llm_bos == "</s>"


def test_qformer_prompt_is_cut_from_the_left(tokenizers):
    processor = _processor(tokenizers, max_qformer_tokens=6)
    qf_ids = processor.collate([_item("a red star is in the image on the green square")], with_answers=False)
    _, qf = tokenizers
    tokens = qf.convert_ids_to_tokens(qf_ids["qformer_input_ids"][0].tolist())
    assert tokens == ["[CLS]", "on", "the", "green", "square", "[SEP]"]  # the end of the prompt kept


def _eos_bias(model, bias: float):
    eos = model.llm_tokenizer.eos_token_id

    def hook(module, args, output):
        output.logits[..., eos] += bias
        return output

    return model.language_model.register_forward_hook(hook)


def test_default_generation_allows_an_empty_answer_and_min_new_tokens_restores_one(tiny_backbone, tokenizers):
    model = make_model(tiny_backbone, tokenizers)
    batch = _processor(tokenizers).collate([_item("a red star ?")], with_answers=False)
    handle = _eos_bias(model, 50.0)  # an LLM whose first step prefers EOS
    try:
        assert model.generate(batch) == [""]
        ids = model.generate(batch, min_new_tokens=1, return_ids=True)[0].tolist()
        answer = [t for t in ids if t not in (model.llm_tokenizer.eos_token_id, model.llm_tokenizer.pad_token_id)]
        assert len(answer) == 1
    finally:
        handle.remove()


def test_max_new_tokens_is_the_number_of_tokens_generated_at_most(tiny_backbone, tokenizers):
    model = make_model(tiny_backbone, tokenizers)
    batch = _processor(tokenizers).collate([_item("a red star ?"), _item(LONG, seed=1)], with_answers=False)
    handle = _eos_bias(model, -1e4)  # never stops by itself
    try:
        for n in (1, 7):
            assert model.generate(batch, max_new_tokens=n, return_ids=True).shape == (2, n)
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="use max_new_tokens"):
        model.generate(batch, max_length=5)
    g = load_config(None, []).generation
    assert (g.max_new_tokens, g.min_new_tokens) == (255, 0)


def test_answer_trailing_whitespace_adds_no_token_before_eos():
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    # SentencePiece-style: a trailing space becomes its own "▁" piece, as with LLaMA's tokenizer.
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", "▁", "▁a", "▁red", "▁star"])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    llm = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    _, qf = build_word_tokenizers(WORDS)
    processor = Processor(qf, llm, image_size=32)
    assert llm("a red star ", add_special_tokens=False).input_ids[-1] == vocab["▁"]
    assert processor.tokenize_answer("a red star \n") == processor.tokenize_answer("a red star") == [5, 6, 7, 2]


def test_paper_precision_casts_exactly_the_released_modules(tiny_backbone, tokenizers):
    model = make_model(tiny_backbone, tokenizers).use_paper_precision()
    for name, p in model.named_parameters():
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if name.startswith("language_model."):
            want = torch.float16  # LAVIS loads the LLM with torch_dtype=float16
        elif name.startswith("vision_model.") and isinstance(parent, (torch.nn.Linear, torch.nn.Conv2d)):
            want = torch.float16  # convert_weights_to_fp16: Conv and Linear layers only
        else:  # ViT LayerNorms, embeddings and q/v biases; Q-Former, query tokens, projection, SAM's layers
            want = torch.float32
        assert p.dtype == want, name
    # fp16 autocast around the ViT and the LLM only; the Q-Former stage runs outside it.
    assert model._autocast("vision").fast_dtype == torch.float16 and model._autocast("vision")._enabled
    assert model._autocast("llm")._enabled and not model._autocast("perception")._enabled
    # The mixed dtypes run end to end (CPU autocast here) and stay close to float32.
    batch = _processor(tokenizers).collate([_item("a red star ?"), _item("what is it ?", n=3, seed=2)],
                                           with_answers=True)
    reference = make_model(tiny_backbone, tokenizers)
    with torch.no_grad():
        assert abs(float(model(batch).loss) - float(reference(batch).loss)) < 0.05
    assert model.generate(batch, max_new_tokens=3, num_beams=2, return_ids=True).shape[0] == 2
    assert load_config(None, ["model.dtype=paper"]).model.dtype == "paper"


def test_truncated_training_prompts_are_counted_once_per_dataset(tokenizers, capsys):
    from sam_mllm.data.schema import Sample
    from sam_mllm.train import report_truncated_prompts

    cfg = load_config(None, ["train.datasets=[{name: a, task: storytelling, path: a}, "
                             "{name: b, task: storytelling, path: b}]"])
    processor = _processor(tokenizers, max_prompt_tokens=8)
    make = lambda text, i: Sample(id=i, img_list=("x.png",), instruction=text, output="a")  # noqa: E731
    sets = [(Path("a"), [make(LONG, 0), make("a red star ?", 1), make(LONG + " ?", 2)]),
            (Path("b"), [make("a red star ?", 0)])]
    report_truncated_prompts(cfg, processor, sets)
    out = capsys.readouterr().out.splitlines()
    assert out == ["a: 2 of 3 training prompts exceed model.max_prompt_tokens=8 LLM tokens; their start is cut"]

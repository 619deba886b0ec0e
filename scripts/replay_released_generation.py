"""Replay of the released SAM code's LLM generation on the embedded tiny backbone, as a test fixture.

The released ``generate`` (github.com/McCartney01/SAM, ``sam/models/sam/sam.py``) tokenises the whole
prompt with ``</s>`` as BOS, puts the visual tokens in front and calls
``llm_model.generate(inputs_embeds=..., max_length=256, min_length=1, num_beams=5, ...)`` under
transformers 4.33.2, which starts from one dummy BOS token. Step ``replay`` does exactly that in an
environment with that transformers version, on visual tokens that step ``inputs`` computed with this
library (the perception path is pinned separately, tests/fixtures/official_sam).
tests/test_released_generation.py then holds ``python -m sam_mllm.evaluate``'s strings against it.

    # 1. in this library's environment
    python scripts/replay_released_generation.py inputs
    # 2. in a separate environment: pip install transformers==4.33.2 tokenizers==0.13.3 torch safetensors
    python scripts/replay_released_generation.py replay [--released-repo CHECKOUT_OF_McCartney01/SAM]

With ``--released-repo`` the released repository's own ``modeling_llama.py`` is imported from the
checkout (nothing of it is copied here); without it, transformers 4.33's LlamaForCausalLM is used.
The tiny backbone's word-level tokenizer stands in for Vicuna's SentencePiece one: the replay
prepends ``bos_token_id`` itself, which is what the released slow LlamaTokenizer does once its
``bos_token`` is set to ``</s>`` (a fast tokenizer's template would keep ``<s>``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BACKBONE = REPO / "sam_mllm" / "assets" / "tiny_backbone"
FIXTURE = REPO / "tests" / "fixtures" / "released_generation"
RELEASED_COMMIT = "ba612469eda6f4c05760e4df14e2c0365cbae1ca"

# Words of the tiny backbone's vocabulary; long prompts repeat story sentences past 128 tokens.
_STORY = ("Given the stories paired with the first several images, can you finish the story based on "
          "the last image?")
_SENTENCES = ("a red star is in the image .", "the blue circle is on the green square .",
              "what object appears in both images ?", "a green square is in the image .")
CASES: list[dict] = [
    {"instruction": "What object appears in both images?", "images": 2},
    {"instruction": "Describe the object the two pictures share.", "images": 2},
    {"instruction": "Sum up the common factor in these three pictures in a single statement.", "images": 3},
    {"instruction": "Name the thing that is in every image.", "images": 4},
    {"instruction": "What is in the image?", "images": 1},
    {"instruction": _STORY + " " + " ".join(_SENTENCES[i % 4] for i in range(14)), "images": 5},
    {"instruction": _STORY + " " + " ".join(_SENTENCES[(i + 1) % 4] for i in range(20)), "images": 4},
    {"instruction": _STORY + " " + " ".join(_SENTENCES[(3 * i) % 4] for i in range(16)), "images": 3},
]


def case_images(index: int, count: int, size: int = 32) -> list[Image.Image]:
    """Deterministic smooth random images (bilinear-upsampled 4x4 noise) for case ``index``."""
    rng = np.random.default_rng([20240601, index])
    return [Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)
            for _ in range(count)]


def write_dataset(folder: Path) -> list[dict]:
    """The cases as a dataset folder (PNG images + annotations.json) for ``sam_mllm.evaluate``."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, case in enumerate(CASES):
        names = []
        for j, im in enumerate(case_images(i, case["images"])):
            names.append(f"case{i}_{j}.png")
            im.save(folder / names[-1])
        records.append({"id": i, "img_list": names, "instruction": case["instruction"], "output": "unused"})
    (folder / "annotations.json").write_text(json.dumps(records, indent=1))
    return records


def make_inputs() -> None:
    """Our perception's visual tokens for every case, and the cases themselves."""
    import tempfile

    from safetensors.torch import save_file

    from sam_mllm.config import load_config
    from sam_mllm.data.processing import Processor, load_image
    from sam_mllm.models import build_model

    cfg = load_config(None, ["model.name=instructblip", f"model.backbone={BACKBONE}"])
    model = build_model(cfg.model)
    processor = Processor.for_model(model, cfg.model)
    transform = processor.transform(train=False)
    tensors = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        records = write_dataset(Path(tmp))
        for r in records:
            images = torch.stack([transform(load_image(Path(tmp) / p)) for p in r["img_list"]])
            batch = processor.collate([{"id": r["id"], "images": images, "instruction": r["instruction"],
                                        "output": ""}], with_answers=False)
            tokens = model._visual_tokens(batch).visual_tokens[0]  # [N, num_query, D]
            tensors[f"case{r['id']}"] = tokens.flatten(0, 1).contiguous()
    FIXTURE.mkdir(parents=True, exist_ok=True)
    save_file(tensors, FIXTURE / "visual_tokens.safetensors")
    (FIXTURE / "cases.json").write_text(json.dumps(CASES, indent=1) + "\n")
    print(f"wrote {len(CASES)} cases to {FIXTURE}")


def _load_llm(released_repo: Path | None):
    """The backbone's LLM as the released code built it, in fp32 (CPU)."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    text = json.loads((BACKBONE / "config.json").read_text())["text_config"]
    config = LlamaConfig(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["num_hidden_layers"], num_attention_heads=text["num_attention_heads"],
        max_position_embeddings=text["max_position_embeddings"], rms_norm_eps=text["rms_norm_eps"],
        bos_token_id=text["bos_token_id"], eos_token_id=text["eos_token_id"], pad_token_id=text["pad_token_id"],
        tie_word_embeddings=text["tie_word_embeddings"],
    )
    if released_repo is None:
        from transformers import LlamaForCausalLM

        source = "transformers.LlamaForCausalLM"
    else:
        import importlib.util

        path = released_repo / "sam" / "models" / "sam" / "modeling_llama.py"
        spec = importlib.util.spec_from_file_location("released_modeling_llama", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        LlamaForCausalLM = module.LlamaForCausalLM  # noqa: N806
        source = "McCartney01/SAM sam/models/sam/modeling_llama.py"
    model = LlamaForCausalLM(config).eval()
    weights = {k[len("language_model."):]: v for k, v in load_file(BACKBONE / "model.safetensors").items()
               if k.startswith("language_model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise SystemExit(f"LLM weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, source


def replay(released_repo: Path | None) -> None:
    import transformers
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(BACKBONE / "tokenizer.json"))
    # sam.py lines 102-105. The pad token: released adds a new "[PAD]" row; the tiny vocabulary has
    # "<pad>" already (pad embeddings are masked out, so which one does not change any output).
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.add_special_tokens({"bos_token": "</s>"})
    tok.add_special_tokens({"eos_token": "</s>"})
    tok.add_special_tokens({"unk_token": "</s>"})
    tok.padding_side = "left"  # sam.py line 319
    model, source = _load_llm(released_repo)
    cases = json.loads((FIXTURE / "cases.json").read_text())
    visual = load_file(FIXTURE / "visual_tokens.safetensors")
    results = []
    for i, case in enumerate(cases):
        # sam.py lines 421-425: the whole prompt, no truncation; slow LlamaTokenizer puts bos_token_id first.
        ids = [tok.bos_token_id] + tok(case["instruction"], add_special_tokens=False).input_ids
        inputs_llm = visual[f"case{i}"][None].float()
        with torch.no_grad():
            embeds = model.get_input_embeddings()(torch.tensor([ids]))
            inputs_embeds = torch.cat([inputs_llm, embeds], dim=1)
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long)
            # sam.py lines 432-446 with the released defaults (evaluation passes no overrides).
            outputs = model.generate(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, do_sample=False, top_p=0.9,
                temperature=1, num_beams=5, max_length=256, min_length=1, repetition_penalty=1.5,
                length_penalty=1, num_return_sequences=1, return_dict_in_generate=True, output_scores=True,
            )
        sequences = outputs["sequences"]
        raw = sequences[0].tolist()
        sequences[sequences == 0] = 2  # sam.py line 450
        text = tok.batch_decode(sequences, skip_special_tokens=True)[0].strip()
        results.append({"id": i, "prompt_tokens": len(ids), "output_ids": raw, "prediction": text})
        print(f"case {i}: {len(ids)} prompt tokens, {len(raw) - 1} generated: {text[:60]!r}")
    (FIXTURE / "expected.json").write_text(json.dumps({
        "released": {"repo": "github.com/McCartney01/SAM", "commit": RELEASED_COMMIT,
                     "follows": "sam/models/sam/sam.py generate(), lines 421-452", "llm_class": source},
        "environment": {"transformers": transformers.__version__, "torch": torch.__version__},
        "dtype": "float32", "batch_size": 1, "results": results,
    }, indent=1) + "\n")
    print(f"wrote {FIXTURE / 'expected.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("inputs", help="cases and visual tokens (this library's environment)")
    rp = sub.add_parser("replay", help="released generation (transformers 4.33.2 environment)")
    rp.add_argument("--released-repo", type=Path, default=None,
                    help="checkout of github.com/McCartney01/SAM: use its own modeling_llama.py")
    args = parser.parse_args()
    if args.step == "inputs":
        make_inputs()
    else:
        replay(args.released_repo)


if __name__ == "__main__":
    main()

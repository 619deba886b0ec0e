"""Word-level tokenisers for backbones built from dimensions (the synthetic world, tests, benchmarks).

Both are plain ``PreTrainedTokenizerFast`` objects, saved and loaded with the standard transformers
calls, in the layout of the Hugging Face InstructBLIP processor (LLM tokenizer at the root,
Q-Former tokenizer in ``qformer_tokenizer/``), so a tiny backbone directory loads like 7B.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

LLM_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # LLaMA's ids 0, 1, 2 kept; pad appended
QFORMER_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # pad id 0 as in BERT
# CLIP's text model pools at the first end-of-text token; an eos id of 2 would select transformers'
# legacy rule (pool at the largest token id), so end-of-text is id 3 here.
CLIP_SPECIALS = ("<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>")


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Same rule as the synthetic generator's tokenize_words: whitespace, then every punctuation
    # character and every digit on its own.
    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated"),
         pre_tokenizers.Digits(individual_digits=True)]
    )


def _word_level(words: Iterable[str], specials: tuple[str, ...], unk: str) -> Tokenizer:
    vocab: dict[str, int] = {}
    for token in (*specials, *words):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    return tok


def build_word_tokenizers(words: Iterable[str]) -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """(LLM tokenizer, Q-Former tokenizer) over the same word list."""
    words = list(words)
    llm = _word_level(words, LLM_SPECIALS, "<unk>")
    llm.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    llm_tok = PreTrainedTokenizerFast(
        tokenizer_object=llm, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        clean_up_tokenization_spaces=True,
    )
    qf = _word_level(words, QFORMER_SPECIALS, "[UNK]")
    qf.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    qf_tok = PreTrainedTokenizerFast(
        tokenizer_object=qf, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", clean_up_tokenization_spaces=True,
    )
    return llm_tok, qf_tok


def build_clip_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer for a CLIP text tower: ``<|startoftext|> words <|endoftext|>``.

    Save it next to a ``CLIPModel`` whose ``text_config.eos_token_id`` is ``eos_token_id`` (3) and
    ``AutoTokenizer.from_pretrained(folder)`` returns it.
    """
    tok = _word_level(words, CLIP_SPECIALS, "<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", pair="<|startoftext|> $A $B <|endoftext|>",
        special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<pad>", clean_up_tokenization_spaces=True,
    )


def default_words() -> list[str]:
    """The synthetic world's vocabulary: what a dims-built backbone speaks by default."""
    from sam_mllm.data.synthetic import vocabulary

    return vocabulary()


def save_tokenizers(llm: PreTrainedTokenizerFast, qformer: PreTrainedTokenizerFast, path: str | Path) -> None:
    path = Path(path)
    llm.save_pretrained(path)
    qformer.save_pretrained(path / "qformer_tokenizer")

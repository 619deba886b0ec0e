"""ROUGE-L, CIDEr and BLEU-4 under the paper's scoring protocol (docs/DESIGN.md §4).

The ``paper`` protocol reproduces the released scorer (DEMON's evaluator plus CIDEr/BLEU) with its
quirks: punctuation is deleted or replaced by a space depending on the *original* text, and only
the first 32 matching periods are removed (``re.UNICODE`` was passed where ``count`` goes). The
``clean`` protocol normalises the same way but removes every period. Scores are x100, 2 decimals.

Where the released scorer crashes, we say why instead: an empty reference or a duplicated id is a
:class:`MetricError` naming the sample; a prediction that normalises to nothing (or to periods
only, which makes the ``rouge`` package raise) scores 0 and stays in the mean.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sam_mllm.errors import UserError
from sam_mllm.registry import register

PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!"]
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(\,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
SUMMARY_KEYS = {"rouge_l": "ROUGE_L", "cider": "CIDEr", "bleu4": "BLEU_4"}


class MetricError(UserError, ValueError):
    """Input the metrics cannot score; names the sample."""


def normalize(text: str, protocol: str = "paper") -> str:
    """The released scorer's normalisation of predictions and references, step by step."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    original = text
    for mark in PUNCTUATION:
        # Decided on the original text: "a - b" loses the dash, "a-b" becomes "a b".
        if (mark + " " in original or " " + mark in original
                or _DIGIT_COMMA_DIGIT.search(original) is not None):
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    if protocol == "paper":
        text = _PERIOD.sub("", text, re.UNICODE)  # count = 32, exactly as released
    elif protocol == "clean":
        text = _PERIOD.sub("", text)
    else:
        raise ValueError(f"unknown metric protocol {protocol!r}; protocols: paper, clean")
    return text.strip("'").strip('"').strip().lower()


@dataclass
class MetricResult:
    summary: dict[str, float]
    # Per-sample scores (x100). BLEU-4 per sample comes from pycocoevalcap's per-item list; the
    # corpus BLEU-4 in ``summary`` is NOT their mean (it pools n-gram counts over the corpus).
    per_sample: dict = field(default_factory=dict)


def _rouge_l(pred: str, refs: Sequence[str]) -> float:
    from rouge import Rouge

    # rouge splits on periods and raises on a hypothesis with no words left: that is a 0.
    if not any(piece.strip() for piece in pred.split(".")):
        return 0.0
    scorer = Rouge(metrics=["rouge-l"])
    return max(scorer.get_scores(pred, ref)[0]["rouge-l"]["f"] for ref in refs)


@register("metric", "rouge_l")
def rouge_l(preds: dict[int, str], refs: dict[int, list[str]]) -> tuple[float, dict[int, float]]:
    per = {k: _rouge_l(preds[k], refs[k]) for k in preds}
    return sum(per.values()) / len(per), per


@register("metric", "cider")
def cider(preds: dict[int, str], refs: dict[int, list[str]]) -> tuple[float, dict[int, float]]:
    from pycocoevalcap.cider.cider import Cider

    keys = list(preds)
    score, items = Cider().compute_score({k: refs[k] for k in keys}, {k: [preds[k]] for k in keys})
    return float(score), {k: float(v) for k, v in zip(keys, items)}


@register("metric", "bleu4")
def bleu4(preds: dict[int, str], refs: dict[int, list[str]]) -> tuple[float, dict[int, float]]:
    import contextlib
    import io

    from pycocoevalcap.bleu.bleu import Bleu

    keys = list(preds)
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its counts
        score, items = Bleu(4).compute_score({k: refs[k] for k in keys}, {k: [preds[k]] for k in keys}, verbose=0)
    return float(score[3]), {k: float(v) for k, v in zip(keys, items[3])}


def score(records: Iterable[tuple], metrics: Sequence[str] = ("rouge_l", "cider", "bleu4"),
          protocol: str = "paper") -> MetricResult:
    """Score ``(sample_id, prediction, [reference, ...])`` records against exactly the references given.

    Which references those are is the caller's choice (``eval.references`` in evaluation, through
    ``Sample.scoring_references``): the paper's protocol gives one reference per sample, the
    ``output`` built as DEMON built its ``response`` (IEdit's three sentences joined with ". ", and so
    on: see ``sam_mllm.data.convert``); the multi-reference alternative gives every human reference.
    With several references CIDEr and BLEU see all of them and ROUGE-L takes the best one per sample
    (identical with one reference).
    """
    from sam_mllm.registry import get

    records = list(records)
    if not records:
        raise MetricError("no predictions to score")
    ids, preds, refs, seen, dups = [], {}, {}, set(), []
    for pos, (sid, pred, references) in enumerate(records):
        if sid in seen:
            dups.append(sid)
        seen.add(sid)
        if isinstance(references, str):
            references = [references]
        references = list(references)
        normed = [normalize(r, protocol) for r in references]
        if not normed or any(not r.replace(".", "").strip() for r in normed):
            raise MetricError(f"sample id {sid!r}: a reference is empty after normalisation "
                              f"({references!r}); fix or drop that sample")
        ids.append(sid)
        preds[pos] = normalize(str(pred), protocol)
        refs[pos] = normed
    if dups:
        raise MetricError(f"duplicated sample ids: {sorted(set(map(str, dups)))[:10]}")
    summary, per_sample = {}, {sid: {} for sid in ids}
    for name in metrics:
        value, per = get("metric", name)(preds, refs)
        key = SUMMARY_KEYS.get(name, name)
        summary[key] = round(value * 100, 2)
        for pos, v in per.items():
            per_sample[ids[pos]][key] = round(v * 100, 2)
    return MetricResult(summary=summary, per_sample=per_sample)


@register("metric", "exact_match")
def exact_match(preds: dict[int, str], refs: dict[int, list[str]]) -> tuple[float, dict[int, float]]:
    """1 when the normalised prediction equals a normalised reference (short answers: "red", "yes")."""
    per = {k: float(" ".join(preds[k].split()) in {" ".join(r.split()) for r in refs[k]}) for k in preds}
    return sum(per.values()) / len(per), per


_WORD = re.compile(r"\w+")


def repetition_loop(text: str, min_repeats: int = 3, max_n: int = 4) -> bool:
    """Whether ``text`` runs into a loop: some 1- to ``max_n``-word sequence repeated at least
    ``min_repeats`` times in a row ("the the the", "in the sea in the sea in the sea")."""
    words = _WORD.findall(text.lower())
    for n in range(1, max_n + 1):
        for start in range(len(words) - n * min_repeats + 1):
            gram = words[start : start + n]
            if all(words[start + r * n : start + (r + 1) * n] == gram for r in range(1, min_repeats)):
                return True
    return False


@register("metric", "repetition_loop")
def repetition_loop_rate(preds: dict[int, str], refs: dict[int, list[str]]) -> tuple[float, dict[int, float]]:
    """Share of predictions that loop (``repetition_loop``); a failure rate, not a quality score."""
    per = {k: float(repetition_loop(preds[k])) for k in preds}
    return sum(per.values()) / len(per), per

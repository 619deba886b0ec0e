"""The demo's index page, report headers and the repetition-loop rate."""

from __future__ import annotations

import json
import re

from sam_mllm.demo import repetition_rates, write_index
from sam_mllm.metrics import repetition_loop, score
from sam_mllm.report import write_html_report


def test_repetition_loop_finds_loops_of_one_to_four_words():
    assert repetition_loop("the the the cat")
    assert repetition_loop("a red star in the sea in the sea in the sea.")
    assert repetition_loop("red ring red ring red ring")
    assert not repetition_loop("a red circle and a blue star and a green ring.")  # repeats, not in a row
    assert not repetition_loop("no no")
    assert not repetition_loop("")


def test_exact_match_and_loop_rate_as_metrics():
    s = score([(1, "Red.", ["red."]), (2, "blue", ["red."]), (3, "the the the", ["a red star"]),
               (4, "a red star.", ["a red  star"])], ["exact_match", "repetition_loop"])
    assert s.summary == {"exact_match": 50.0, "repetition_loop": 25.0}
    assert s.per_sample[3] == {"exact_match": 0.0, "repetition_loop": 100.0}


def test_report_names_its_model_and_links_back(tmp_path):
    rows = [{"id": 1, "images": [], "instruction": "q", "prediction": "a", "references": ["a"], "scores": {}}]
    page = write_html_report(tmp_path / "r.html", title="t", rows=rows, summary={}, model="sam on <tiny>",
                             links=[("../../../index.html", "back to the demo index")]).read_text()
    assert "model: <b>sam on &lt;tiny&gt;</b>" in page
    assert "<a href='../../../index.html'>back to the demo index</a>" in page


def _fake_run(out, variant, preds):
    folder = out / variant / "eval" / "synthetic_group_captioning"
    folder.mkdir(parents=True)
    (folder / "predictions.jsonl").write_text("".join(json.dumps({"id": k, "prediction": p}) + "\n"
                                                      for k, p in enumerate(preds)))


def test_index_puts_both_models_side_by_side_with_loop_rates(tmp_path):
    _fake_run(tmp_path, "data", ["a red star", "in the sea in the sea in the sea", "a ring", "a cross"])
    _fake_run(tmp_path, "sam", ["a red star"] * 4)
    summary = {"ROUGE_L": 30.0, "CIDEr": 20.0, "BLEU_4": 1.0}
    results = {"+DATA": {"synthetic_group_captioning": summary}, "SAM": {"synthetic_group_captioning": summary}}
    assert repetition_rates(tmp_path, results) == {"+DATA": {"synthetic_group_captioning": 25.0},
                                                   "SAM": {"synthetic_group_captioning": 0.0}}
    page = write_index(tmp_path, results, 12.0).read_text()
    row = re.search(r"<tr><td>synthetic_group_captioning</td>.*?</tr>", page).group(0)
    assert row.index("data/eval/synthetic_group_captioning/report.html") < \
        row.index("sam/eval/synthetic_group_captioning/report.html")  # one row, +DATA then SAM
    assert "<td>25</td>" in row and "<td>0</td>" in row
    assert "RESULTS.md" in page and "zero-shot" in page

from __future__ import annotations

import json
import re
import sys

import pytest
from PIL import Image

from sam_mllm.report import curves_figure, plot_curves, write_html_report


def _images(folder, n: int) -> list[str]:
    paths = []
    for k in range(n):
        p = folder / f"img{k}.png"
        Image.new("RGB", (64 + 32 * k, 48), (40 * k, 120, 200)).save(p)
        paths.append(str(p))
    return paths


def _rows(tmp_path) -> list[dict]:
    imgs = _images(tmp_path, 3)
    return [
        {"id": 1, "images": imgs[:2], "instruction": "What is shared by {image#1} and {image#2}?",
         "prediction": "a red star", "references": ["a red star", "the red star"],
         "scores": {"ROUGE_L": 100.0, "CIDEr": 250.5, "BLEU_4": 80.0}},
        {"id": "b-2", "images": [imgs[0], str(tmp_path / "gone.jpg")], "instruction": "Describe {image#2}.",
         "prediction": "blue", "references": ["a blue circle"],
         "scores": {"ROUGE_L": 41.2, "CIDEr": 80.1, "BLEU_4": 12.3}},
        {"id": 3, "images": [imgs[2], imgs[1], imgs[0]], "instruction": '<b>{image#1}</b> & "x"',
         "prediction": "<script>alert(1)</script>", "references": ["x < y", "a & b"],
         "scores": {"ROUGE_L": 0.0, "CIDEr": 3.25, "BLEU_4": 0.0}},
    ]


def test_html_report_is_self_contained_and_escaped(tmp_path):
    out = write_html_report(tmp_path / "sub" / "report.html", title="tiny <set> (captioning)",
                            rows=_rows(tmp_path), summary={"ROUGE_L": 47.07, "CIDEr": 111.28, "BLEU_4": 30.77},
                            bad_samples=[{"index": 4, "id": 9, "reason": "image <x> not found"}])
    assert out == tmp_path / "sub" / "report.html" and out.is_file()
    page = out.read_text(encoding="utf-8")
    assert "&lt;b&gt;{image#1}&lt;/b&gt; &amp; &quot;x&quot;" in page
    assert "<b>{image#1}</b>" not in page and "<script>alert" not in page
    assert "tiny &lt;set&gt; (captioning)" in page and "x &lt; y" in page
    # Three distinct readable images, each embedded once although img0 is shown in every row.
    assert page.count("data:image/jpeg;base64,") == 3
    assert "missing: gone.jpg" in page
    assert all(v in page for v in ("47.07", "111.28", "30.77", "250.50", "12.30"))
    assert "image &lt;x&gt; not found" in page
    assert "<script>" in page and "id='filter'" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "@import" not in page and "url(http" not in page
    assert not list(out.parent.glob("*.tmp"))


def test_html_report_max_rows_and_unreadable_image(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rows = _rows(tmp_path)
    rows[0]["images"] = [str(broken)]
    out = write_html_report(tmp_path / "r.html", title="t", rows=rows, summary={"CIDEr": 1.0}, max_rows=1)
    page = out.read_text(encoding="utf-8")
    assert "unreadable: broken.png" in page and "data:image/jpeg;base64," not in page
    assert "Only the first 1 of 3 samples are shown" in page and "per_sample.jsonl" in page
    assert page.count("<tr><td>") == 1
    # Per-sample metrics the summary does not name still get a column.
    assert ">ROUGE_L</th>" in page


def _write_log(path) -> None:
    lines = [json.dumps({"step": 10 * (i + 1), "loss": 3.0 / (i + 1), "lr": 1e-5 * (i + 1),
                         "samples_per_sec": 100.0 + i, "note": "text"}) for i in range(20)]
    lines.insert(10, json.dumps({"step": 100, "eval/synthetic_group_captioning/CIDEr": 55.0}))
    lines.append(json.dumps({"step": 200, "eval/synthetic_group_captioning/CIDEr": 71.5}))
    path.write_text("\n".join(lines) + '\n{"step": 210, "loss": 0.1')


def test_plot_curves_writes_png(tmp_path):
    log = tmp_path / "log.jsonl"
    _write_log(log)
    png = plot_curves(log, tmp_path / "curves.png")
    assert png == tmp_path / "curves.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 0 and im.height > 0


def test_curves_fill_the_grid_with_training_then_validation_panels():
    series = {"loss": {1: 2.0, 2: 1.5}, "lr": {1: 1e-3, 2: 5e-4}, "grad_norm": {1: 1.0, 2: 0.9},
              "samples_per_sec": {1: 3.0, 2: 3.1}, "eval/mmlink/CIDEr": {2: 40.0}}
    fig = curves_figure(series, title="runs/x (sam)")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "lr", "grad_norm", "samples_per_sec", "eval/mmlink/CIDEr"]  # 5 panels, no blanks
    assert fig._suptitle.get_text() == "runs/x (sam)"
    # the short last row is stretched: its two panels together are as wide as the three above
    first_row = [ax.get_position() for ax in fig.axes[:3]]
    last_row = [ax.get_position() for ax in fig.axes[3:]]
    assert last_row[-1].x1 == pytest.approx(first_row[-1].x1, abs=0.02)
    assert last_row[0].width > first_row[0].width * 1.3


def test_plot_curves_without_matplotlib_warns(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    _write_log(log)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(UserWarning, match="pip install matplotlib"):
        assert plot_curves(log, tmp_path / "curves.png") is None
    assert not (tmp_path / "curves.png").exists()


def test_plot_curves_with_nothing_numeric_returns_none(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "msg": "hi"}\n')
    with pytest.warns(UserWarning, match="no numeric fields"):
        assert plot_curves(log, tmp_path / "c.png") is None

"""Self-contained HTML reports of evaluation runs, and PNG curves of training logs."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:4px 8px;vertical-align:top}
th{background:#f4f4f4;cursor:pointer;position:sticky;top:0}th:hover{background:#e8e8e8}
.thumbs figure{display:inline-block;margin:0 4px 0 0;text-align:center;font-size:11px;color:#666}
.missing{display:inline-block;width:80px;height:60px;background:#fee;color:#a00;font-size:11px}
.summary td{border:none;padding:2px 12px}.instr{max-width:28em}.pred{max-width:20em;font-weight:600}
input{margin:.8em 0;padding:4px;width:24em}
"""

_SCRIPT = """
const table=document.getElementById('rows');let dir={};
document.querySelectorAll('#rows th').forEach((th,i)=>th.onclick=()=>{
 const body=table.tBodies[0];const rows=[...body.rows];dir[i]=!dir[i];
 const key=r=>{const v=r.cells[i].dataset.v??r.cells[i].innerText;const n=parseFloat(v);return isNaN(n)?v:n};
 rows.sort((a,b)=>{const x=key(a),y=key(b);return (x>y?1:x<y?-1:0)*(dir[i]?1:-1)});
 rows.forEach(r=>body.appendChild(r));});
document.getElementById('filter').oninput=e=>{const q=e.target.value.toLowerCase();
 [...table.tBodies[0].rows].forEach(r=>r.style.display=r.innerText.toLowerCase().includes(q)?'':'none')};
"""


def _thumbnail(path: str, size: int, cache: dict[str, str]) -> str:
    if path not in cache:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                im.thumbnail((size, size))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=80)
            cache[path] = f"<img src='data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}'>"
        except (OSError, ValueError):
            cache[path] = f"<span class='missing'>missing: {html.escape(Path(path).name)}</span>"
    return cache[path]


def write_html_report(path: str | Path, *, title: str, rows: Sequence[Mapping], summary: Mapping[str, float],
                      bad_samples: Sequence[Mapping] = (), thumb_size: int = 96,
                      max_rows: int | None = None) -> Path:
    """One HTML file (images embedded) with a sortable, filterable row per sample.

    Rows: ``id``, ``images`` (paths), ``instruction``, ``prediction``, ``references``, ``scores``.
    ``max_rows`` caps very large reports; per_sample.jsonl beside the report keeps everything.
    """
    path = Path(path)
    shown = list(rows)[:max_rows] if max_rows else list(rows)
    metrics = list(summary)
    cache: dict[str, str] = {}
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{esc(title)}</h1>",
             "<table class='summary'><tr>" + "".join(f"<td><b>{esc(k)}</b> {v:.2f}</td>" for k, v in summary.items())
             + f"<td><b>samples</b> {len(rows)}</td></tr></table>"]
    if len(shown) < len(rows):
        parts.append(f"<p>Showing the first {len(shown)} of {len(rows)} samples; all of them are in "
                     "per_sample.jsonl.</p>")
    if bad_samples:
        parts.append(f"<details><summary>{len(bad_samples)} bad samples skipped</summary><ul>"
                     + "".join(f"<li>#{b['index']} id {esc(str(b['id']))}: {esc(str(b['reason']))}</li>"
                               for b in bad_samples) + "</ul></details>")
    parts.append("<input id='filter' placeholder='filter rows by text'>")
    head = ["id", "images", "instruction", "prediction", "references", *metrics]
    parts.append("<table id='rows'><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head)
                 + "</tr></thead><tbody>")
    for r in shown:
        thumbs = "".join(f"<figure>{_thumbnail(str(p), thumb_size, cache)}<figcaption>{k + 1}</figcaption></figure>"
                         for k, p in enumerate(r["images"]))
        refs = "<br>".join(esc(x) for x in r["references"])
        scores = "".join(f"<td data-v='{r['scores'].get(m, '')}'>{r['scores'].get(m, float('nan')):.2f}</td>"
                         for m in metrics)
        parts.append(f"<tr><td>{esc(str(r['id']))}</td><td class='thumbs'>{thumbs}</td>"
                     f"<td class='instr'>{esc(r['instruction'])}</td><td class='pred'>{esc(r['prediction'])}</td>"
                     f"<td>{refs}</td>{scores}</tr>")
    parts.append(f"</tbody></table><script>{_SCRIPT}</script></body></html>")
    _atomic_write(path, "".join(parts))
    return path


def _atomic_write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, path)


def plot_curves(jsonl_path: str | Path, png_path: str | Path, *, x: str = "step") -> Path | None:
    """One panel per numeric field of a JSONL log (loss, lr, then the rest) against ``x``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("plotting the training curves needs matplotlib: pip install matplotlib", stacklevel=2)
        return None
    series: dict[str, tuple[list, list]] = {}
    for line in Path(jsonl_path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if x not in record:
            continue
        for key, value in record.items():
            if key != x and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, ([], []))
                series[key][0].append(record[x])
                series[key][1].append(value)
    if not series:
        return None
    order = [k for k in ("loss", "lr") if k in series] + sorted(k for k in series if k not in ("loss", "lr"))
    cols = min(3, len(order))
    nrows = (len(order) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, order):
        xs, ys = series[key]
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(x)
    for ax in list(axes.flat)[len(order):]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    _atomic_write(Path(png_path), buf.getvalue())
    return Path(png_path)

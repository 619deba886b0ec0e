"""Self-contained HTML reports of evaluation runs, and PNG curves of training logs.

``write_html_report`` writes one HTML file that opens offline from a ``file://`` URL: the thumbnails are
embedded as base64 JPEG data URIs and the CSS / JS are inline, so a report can be copied off a cluster or
attached to an issue on its own. ``plot_curves`` draws every numeric field of a ``log.jsonl`` training
log against the step.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sam_mllm.data.images import ImageLoadError, load_image

__all__ = ["write_html_report", "write_side_by_side_report", "plot_curves"]

_esc = html.escape

_STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.2em 1.5em;color:#222;background:#fff}
h1{font-size:1.4em;margin:.2em 0 .6em}
table{border-collapse:collapse}
.summary td,.summary th{border:1px solid #ddd;padding:3px 10px;text-align:right}
.summary th{background:#f4f4f4;text-align:left;font-weight:600}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:.8em 0}
details{margin:.8em 0}details li{font-family:ui-monospace,monospace;font-size:12px}
.bar{margin:1em 0 .5em;display:flex;gap:1em;align-items:center}
.bar input{padding:5px 8px;width:26em;font:inherit}.bar span{color:#666}
#rows{width:100%}
#rows td,#rows th{border-bottom:1px solid #e4e4e4;padding:5px 8px;vertical-align:top;text-align:left}
#rows th{background:#f4f4f4;position:sticky;top:0;cursor:pointer;user-select:none;white-space:nowrap;z-index:1}
#rows th:hover{background:#e6e6e6}
#rows th[data-dir=asc]::after{content:" \\25B2"}#rows th[data-dir=desc]::after{content:" \\25BC"}
#rows tbody tr:hover{background:#fafafa}
.txt{white-space:pre-wrap;word-break:break-word;max-width:26em}
.pred{font-weight:600}
.refs div{white-space:pre-wrap;word-break:break-word;max-width:26em;color:#444}
.refs div+div{border-top:1px dashed #e0e0e0;margin-top:2px;padding-top:2px}
.num{text-align:right!important;font-variant-numeric:tabular-nums;white-space:nowrap}
.imgs{white-space:nowrap}
.imgs figure{display:inline-block;margin:0 4px 0 0;text-align:center;vertical-align:top}
.imgs figcaption{font-size:11px;color:#666}
.t{display:block;background-size:contain;background-repeat:no-repeat;border:1px solid #ccc}
.missing{display:flex;align-items:center;justify-content:center;box-sizing:border-box;padding:2px;
 background:#fdecec;color:#a00;border:1px dashed #d88;font-size:10px;word-break:break-all;overflow:hidden}
"""

# Sort keys are computed once per click (not per comparison) so 5,000 rows sort instantly; cells with no
# value (a metric missing for a sample) stay at the bottom in both directions.
_SCRIPT = """
(function(){
const table=document.getElementById('rows'),body=table.tBodies[0],ths=[...table.tHead.rows[0].cells];
const count=document.getElementById('count');
function key(cell,num){const v=cell.dataset.v!==undefined?cell.dataset.v:cell.textContent.trim();
 if(!num)return v.toLowerCase();const n=parseFloat(v);return isNaN(n)?null:n;}
ths.forEach((th,i)=>th.addEventListener('click',()=>{
 const asc=th.dataset.dir!=='asc',num=th.dataset.type==='num',sign=asc?1:-1;
 ths.forEach(h=>delete h.dataset.dir);th.dataset.dir=asc?'asc':'desc';
 const keyed=[...body.rows].map(r=>[key(r.cells[i],num),r]);
 keyed.sort((a,b)=>{const x=a[0],y=b[0];if(x===y)return 0;if(x===null||x==='')return 1;if(y===null||y==='')return -1;
  return (num?x-y:x.localeCompare(y,undefined,{numeric:true}))*sign;});
 const frag=document.createDocumentFragment();keyed.forEach(k=>frag.appendChild(k[1]));body.appendChild(frag);}));
const text=new WeakMap();
document.getElementById('filter').addEventListener('input',e=>{
 const q=e.target.value.trim().toLowerCase();let shown=0;
 for(const r of body.rows){if(!text.has(r))text.set(r,r.textContent.toLowerCase());
  const ok=!q||text.get(r).includes(q);r.style.display=ok?'':'none';shown+=ok;}
 count.textContent=q?shown+' of '+body.rows.length+' rows match':'';});
})();
"""


def write_html_report(path: str | Path, *, title: str, rows: Sequence[Mapping], summary: Mapping[str, float],
                      bad_samples: Sequence[Mapping] = (), thumb_size: int = 96, max_rows: int | None = None,
                      full_results: str | None = "per_sample.jsonl", image_mode: str = "released",
                      model: str | None = None, links: Sequence[tuple[str, str]] = ()) -> Path:
    """Write one self-contained HTML page showing what a model got right and wrong on a dataset.

    Args:
        path: the ``.html`` file to write (atomically; parent folders are created).
        title: page title, e.g. ``"dataset (task)"``.
        rows: one mapping per sample with ``id``, ``images`` (file paths; missing or unreadable files get a
            placeholder), ``instruction``, ``prediction``, ``references`` (list of str) and ``scores``
            (metric name -> float).
        summary: dataset-level metrics, shown in a table at the top.
        bad_samples: samples dropped when loading, each with ``index``, ``id`` and ``reason``.
        thumb_size: longest side of the embedded JPEG thumbnails, in pixels.
        max_rows: show only the first ``max_rows`` samples (``None``: all). Each thumbnail costs a few KB,
            so this keeps reports of very large datasets openable in a browser; the summary still covers
            every sample and the page says that rows were left out.
        full_results: where the per-sample scores of all samples are, named in the page when ``max_rows``
            leaves rows out (``None``: name nothing).
        image_mode: how the model loaded the images (``data.image_mode``); thumbnails go through the same
            loader, so the page shows what the model saw.
        model: which model made the predictions, shown under the title.
        links: ``(href, text)`` pairs shown under the title (e.g. back to an index page).

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    shown = rows[:max_rows] if max_rows is not None else rows
    metrics = _metric_columns(summary, shown)
    thumbs = _thumbnails([str(p) for r in shown for p in _as_list(r.get("images"))], thumb_size, image_mode)
    classes, out = _page_head(title, thumbs, thumb_size)
    out.append(f"<h1>{_esc(title)}</h1>")
    if model:
        out.append(f"<p class='note'>model: <b>{_esc(model)}</b></p>")
    if links:
        out.append("<p>" + " · ".join(f"<a href='{_esc(h)}'>{_esc(t)}</a>" for h, t in links) + "</p>")

    out.append("<table class='summary'><tbody>")
    for k, v in summary.items():
        out.append(f"<tr><th>{_esc(str(k))}</th><td>{_esc(_fmt(v))}</td></tr>")
    out.append(f"<tr><th>samples</th><td>{len(rows)}</td></tr>")
    if bad_samples:
        out.append(f"<tr><th>bad samples (skipped)</th><td>{len(bad_samples)}</td></tr>")
    out.append("</tbody></table>")

    if len(shown) < len(rows):
        where = f" The per-sample scores of all of them are in {_esc(full_results)} next to this file." \
            if full_results else ""
        out.append(f"<p class='note'>Only the first {len(shown)} of {len(rows)} samples are shown (max_rows)."
                   f"{where}</p>")
    if bad_samples:
        # Open by default while the list is short enough to read at a glance.
        n_bad = len(bad_samples)
        out.append(f"<details{' open' if n_bad <= 20 else ''}><summary>{n_bad} bad sample"
                   f"{' was' if n_bad == 1 else 's were'} skipped when loading</summary><ul>")
        for b in bad_samples:
            out.append(f"<li>#{_esc(str(b.get('index', '?')))} id {_esc(str(b.get('id', '?')))}: "
                       f"{_esc(str(b.get('reason', '')))}</li>")
        out.append("</ul></details>")

    out.append("<div class='bar'><input id='filter' type='search' placeholder='filter rows by text…' "
               "autocomplete='off'><span id='count'></span></div>")
    head = [("id", "text", ""), ("images", "num", "sort by number of images"), ("instruction", "text", ""),
            ("prediction", "text", ""), ("words", "num", "number of words in the prediction"),
            ("references", "text", "")] + [(m, "num", "") for m in metrics]
    out.append("<table id='rows'><thead><tr>")
    for name, kind, tip in head:
        tip_attr = f" title='{_esc(tip)}'" if tip else ""
        out.append(f"<th data-type='{kind}'{tip_attr}>{_esc(name)}</th>")
    out.append("</tr></thead><tbody>")
    for r in shown:
        out.append(_row(r, metrics, thumbs, classes))
    out.append("</tbody></table>")
    if not shown:
        out.append("<p>No samples.</p>")
    out.append(f"<script>{_SCRIPT}</script></body></html>\n")
    _atomic_write(path, "".join(out).encode("utf-8"))
    return path



def _page_head(title: str, thumbs: dict[str, tuple[int, int, str] | None], thumb_size: int,
               extra_css: str = "") -> tuple[dict[str, str], list[str]]:
    """The page's head: each distinct image embedded once, as a CSS class, however many rows show it.
    Returns the class of each image path and the HTML so far."""
    classes = {p: f"t{k}" for k, p in enumerate(sorted(p for p, t in thumbs.items() if t is not None))}
    out = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
           "<meta name='viewport' content='width=device-width,initial-scale=1'>",
           f"<title>{_esc(title)}</title><style>{_STYLE}"]
    for p, cls in classes.items():
        w, h, data = thumbs[p]
        out.append(f".{cls}{{width:{w}px;height:{h}px;background-image:url(data:image/jpeg;base64,{data})}}\n")
    out.append(f".missing{{width:{thumb_size}px;height:{max(24, thumb_size * 2 // 3)}px}}{extra_css}"
               "</style></head><body>")
    return classes, out

def _row(r: Mapping, metrics: list[str], thumbs: dict[str, tuple[int, int, str] | None],
         classes: dict[str, str]) -> str:
    images = _as_list(r.get("images"))
    recalled = _as_list(r.get("recalled_words"))  # SEA's diagnostic, one string per image when present
    figs = []
    for k, p in enumerate(images, start=1):
        p = str(p)
        name = _esc(Path(p).name)
        if p in classes:
            cell = f"<i class='t {classes[p]}' role='img' aria-label='image #{k}' title='{_esc(p)}'></i>"
        else:
            why = "missing" if not os.path.exists(p) else "unreadable"
            cell = f"<span class='missing' title='{_esc(p)}'>{why}: {name}</span>"
        words = f"<br><small title='recalled words'>{_esc(str(recalled[k - 1]))}</small>" if k <= len(recalled) else ""
        figs.append(f"<figure>{cell}<figcaption>#{k}{words}</figcaption></figure>")
    prediction = str(r.get("prediction") or "")
    refs = "".join(f"<div>{_esc(str(x))}</div>" for x in _as_list(r.get("references")))
    scores = r.get("scores") or {}
    cells = []
    for m in metrics:
        v = scores.get(m)
        if _is_number(v) and math.isfinite(v):
            cells.append(f"<td class='num' data-v='{v!r}'>{v:.2f}</td>")
        else:
            cells.append("<td class='num' data-v=''>–</td>")
    return (f"<tr><td>{_esc(str(r.get('id', '')))}</td><td class='imgs' data-v='{len(images)}'>{''.join(figs)}</td>"
            f"<td class='txt'>{_esc(str(r.get('instruction') or ''))}</td><td class='txt pred'>{_esc(prediction)}</td>"
            f"<td class='num'>{len(prediction.split())}</td><td class='refs'>{refs}</td>{''.join(cells)}</tr>\n")


def _metric_columns(summary: Mapping[str, object], rows: Sequence[Mapping]) -> list[str]:
    """Score columns: the per-sample metrics, in the summary's order first, then the others as they come.

    Summary entries that no sample has (counts, timings) are not columns.
    """
    in_rows = list(dict.fromkeys(k for r in rows for k in (r.get("scores") or {})))
    first = [k for k, v in summary.items() if _is_number(v) and k in in_rows]
    return first + [k for k in in_rows if k not in first]


def _thumbnails(paths: list[str], size: int, mode: str = "released") -> dict[str, tuple[int, int, str] | None]:
    """Thumbnail every distinct path once: (width, height, base64 JPEG), or None when it cannot be read."""
    unique = list(dict.fromkeys(paths))
    if not unique:
        return {}
    # Pillow releases the GIL while decoding and encoding, so threads speed up reports with many images.
    workers = min(8, os.cpu_count() or 1, len(unique))
    if workers == 1:
        return {p: _thumbnail(p, size, mode) for p in unique}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(unique, pool.map(lambda p: _thumbnail(p, size, mode), unique)))


def _thumbnail(path: str, size: int, mode: str = "released") -> tuple[int, int, str] | None:
    try:
        # The model's loader (same orientation, alpha and bit-depth handling); JPEGs decode straight
        # at a reduced scale, which is most of the cost for camera photos.
        im = load_image(path, mode=mode, draft=(size, size))
    except ImageLoadError:
        return None
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=75)
    return im.width, im.height, base64.b64encode(buf.getvalue()).decode("ascii")


def _as_list(value: object) -> list:
    if value is None:
        return []
    if isinstance(value, (str, bytes, os.PathLike)):
        return [value]
    return list(value)  # type: ignore[call-overload]


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v: object) -> str:
    if isinstance(v, bool) or not _is_number(v):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if v == 0 or not math.isfinite(v) or abs(v) >= 0.01:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _atomic_write(path: Path, data: bytes) -> None:
    """Readers (a browser, a sync job) never see half a file: write a temp file beside it, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp creates the file 0600; give the report the permissions an ordinary new file would get.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_curves(jsonl_path: str | Path, png_path: str | Path, *, x: str = "step",
                title: str | None = None) -> Path | None:
    """Draw one panel per numeric field of a JSONL log against ``x`` and save it as a PNG.

    Lines may carry different fields (training lines: ``loss``, ``lr``, ...; evaluation lines:
    ``eval/<dataset>/<metric>``). Panels come as ``loss``, ``lr``, the other training fields, then
    the validation metrics of periodic evaluation, every cell of the grid filled (a short last row
    gets wider panels). ``title`` (default: the log's folder, i.e. the run) heads the figure. Lines
    that are not JSON objects (e.g. a last line torn by a crash), lines without a numeric ``x`` and
    non-numeric values are skipped; when a step was logged twice (a resumed run), the last value wins.

    Returns the PNG path, or None (with a warning) when matplotlib is not installed or the log has no
    numeric field to plot.
    """
    try:
        # Imported here so that the library works without matplotlib; ``import matplotlib`` first, so a
        # missing package is caught even when a submodule is still cached in sys.modules.
        import matplotlib
    except ImportError:
        warnings.warn("plotting training curves needs matplotlib: pip install matplotlib "
                      f"(skipped {png_path})", stacklevel=2)
        return None
    del matplotlib

    series: dict[str, dict[float, float]] = {}
    with open(jsonl_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or not _is_number(record.get(x)):
                continue
            for key, value in record.items():
                if key != x and _is_number(value):
                    series.setdefault(key, {})[record[x]] = value
    if not series:
        warnings.warn(f"no numeric fields to plot in {jsonl_path}", stacklevel=2)
        return None
    fig = curves_figure(series, x, title if title is not None else Path(jsonl_path).resolve().parent.name)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    png_path = Path(png_path)
    _atomic_write(png_path, buf.getvalue())
    return png_path


def curves_figure(series: Mapping[str, Mapping[float, float]], x: str = "step", title: str = ""):
    """The matplotlib Figure of :func:`plot_curves` from ``{field: {x: value}}``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first = [k for k in ("loss", "lr") if k in series]
    rest = sorted(k for k in series if k not in first)
    order = first + [k for k in rest if not k.startswith("eval/")] + [k for k in rest if k.startswith("eval/")]
    cols = min(3, len(order))
    nrows = -(-len(order) // cols)
    last = len(order) - cols * (nrows - 1)  # panels in the last row
    # A grid of cols * last columns: full rows' panels span `last` columns, the last row's span `cols`,
    # so a short last row is stretched instead of leaving empty cells.
    # A bare Figure with an Agg canvas leaves pyplot's global backend and figure list alone, which matters
    # when this runs inside a notebook or another program's process.
    fig = Figure(figsize=(4.6 * cols, 2.9 * nrows + (0.4 if title else 0)))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(nrows, cols * last)
    # One x range for every panel, so that sparse evaluation points line up with the training curves.
    all_x = [step for points in series.values() for step in points]
    lo, hi = min(all_x), max(all_x)
    pad = (hi - lo) * 0.03 or 1
    for i, key in enumerate(order):
        row, col = divmod(i, cols)
        span = cols if row == nrows - 1 else last
        ax = fig.add_subplot(grid[row, col * span:(col + 1) * span])
        points = sorted(series[key].items())
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        # Evaluation fields have a handful of points; markers keep a single one visible.
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.2,
                color="tab:orange" if key.startswith("eval/") else "tab:blue")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(x, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if key == "lr" or key.endswith("/lr"):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_side_by_side_report(path: str | Path, *, title: str, samples: Sequence[Mapping],
                              runs: Mapping[str, Mapping], sort_metric: str = "CIDEr",
                              thumb_size: int = 96) -> Path:
    """One page comparing several models on one dataset (the paper's Fig. 4 case studies, for every sample).

    Args:
        path: the ``.html`` file to write (atomically).
        title: page title.
        samples: one mapping per sample, in dataset order, with ``id``, ``images`` (file paths),
            ``instruction`` and ``references``; each sample's thumbnails appear once, whatever the number of runs.
        runs: model name -> ``{"summary": {metric: value}, "per_sample": {json.dumps(id): {"prediction": str,
            "scores": {metric: value}}}}``. The first run is the reference of the difference columns.
        sort_metric: the metric a model's column sorts by, and of which the differences are shown.

    Each model's column holds its prediction and scores; a "Δ <metric> (model − first)" column per
    other model sorts the samples by how much better or worse that model does than the first.
    """
    path = Path(path)
    names = list(runs)
    if not names:
        raise ValueError("write_side_by_side_report: no runs given")
    metrics = list(dict.fromkeys(k for r in runs.values() for k, v in r["summary"].items() if _is_number(v)
                                 and any(k in (s.get("scores") or {}) for s in r["per_sample"].values())))
    if sort_metric not in metrics and metrics:
        sort_metric = metrics[0]
    thumbs = _thumbnails([str(p) for s in samples for p in _as_list(s.get("images"))], thumb_size)
    classes, out = _page_head(title, thumbs, thumb_size,
                              ".sc{color:#555;font-size:12px;margin-top:3px}.pos{color:#070}.neg{color:#a00}")
    out.append(f"<h1>{_esc(title)}</h1><table class='summary'><thead><tr><th>model</th>")
    out.extend(f"<th>{_esc(m)}</th>" for m in metrics)
    out.append("</tr></thead><tbody>")
    for name in names:
        summary = runs[name]["summary"]
        out.append(f"<tr><th>{_esc(name)}</th>" + "".join(
            f"<td>{_esc(_fmt(summary.get(m, '–')))}</td>" for m in metrics) + "</tr>")
    out.append(f"</tbody></table><p class='note'>{len(samples)} samples. Click a model's column to sort by its "
               f"{_esc(sort_metric)}, a Δ column to sort by the difference to {_esc(names[0])}.</p>")
    out.append("<div class='bar'><input id='filter' type='search' placeholder='filter rows by text…' "
               "autocomplete='off'><span id='count'></span></div><table id='rows'><thead><tr>")
    head = [("id", "text"), ("images", "num"), ("instruction", "text"), ("references", "text")]
    head += [(n, "num") for n in names] + [(f"Δ {sort_metric} ({n} − {names[0]})", "num") for n in names[1:]]
    out.extend(f"<th data-type='{kind}'>{_esc(h)}</th>" for h, kind in head)
    out.append("</tr></thead><tbody>")
    for s in samples:
        key = json.dumps(s["id"])
        figs = []
        for k, p in enumerate(_as_list(s.get("images")), start=1):
            p = str(p)
            if p in classes:
                cell = f"<i class='t {classes[p]}' role='img' aria-label='image #{k}' title='{_esc(p)}'></i>"
            else:
                cell = f"<span class='missing' title='{_esc(p)}'>missing: {_esc(Path(p).name)}</span>"
            figs.append(f"<figure>{cell}<figcaption>#{k}</figcaption></figure>")
        refs = "".join(f"<div>{_esc(str(x))}</div>" for x in _as_list(s.get("references")))
        cells = [f"<td>{_esc(str(s['id']))}</td><td class='imgs' data-v='{len(figs)}'>{''.join(figs)}</td>",
                 f"<td class='txt'>{_esc(str(s.get('instruction') or ''))}</td><td class='refs'>{refs}</td>"]
        values = []
        for name in names:
            rec = runs[name]["per_sample"].get(key) or {}
            scores = rec.get("scores") or {}
            v = scores.get(sort_metric)
            values.append(v if _is_number(v) else None)
            line = " · ".join(f"{m} {scores[m]:.2f}" for m in metrics if _is_number(scores.get(m)))
            data_v = repr(v) if _is_number(v) else ""
            cells.append(f"<td class='txt pred' data-v='{data_v}'>{_esc(str(rec.get('prediction', '')))}"
                         f"<div class='sc'>{_esc(line)}</div></td>")
        for v in values[1:]:
            if v is None or values[0] is None:
                cells.append("<td class='num' data-v=''>–</td>")
            else:
                d = v - values[0]
                cls = "pos" if d > 0 else "neg" if d < 0 else ""
                cells.append(f"<td class='num {cls}' data-v='{d!r}'>{d:+.2f}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>\n")
    out.append("</tbody></table>")
    # ``page.html#sort=K`` opens sorted by column K (clicked twice: descending), so a link can show
    # the largest differences first; data-ready tells a headless browser that the script ran.
    out.append(f"<script>{_SCRIPT}(function(){{const m=location.hash.match(/sort=(\\d+)(-desc)?/);"
               "if(m){const th=document.querySelectorAll('#rows th')[+m[1]];if(th){th.click();if(m[2])th.click();}}"
               "document.body.dataset.ready='1';})();</script></body></html>\n")
    _atomic_write(path, "".join(out).encode("utf-8"))
    return path

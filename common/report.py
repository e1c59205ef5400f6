"""The review page: OUT/report.html, one offline page (file://, no CDN, no server) with a row per
image (thumbnail, explanation overlay, score, decision, true label), sortable by score, filtered
by flagged / not flagged / wrong, the summary metrics, ROC curve and confusion matrix, and the
threshold with where it came from. Thumbnails and plots are relative files in report_files/;
images load lazily, so the page stays quick at thousands of rows."""
from __future__ import annotations

import html
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.explain import png_bytes, write_quick
from common.io import UserError, atomic_open, atomic_write_text, load_image

REPORT = "report.html"
FILES = "report_files"
THUMB = 160


@dataclass
class Row:
    image: Path                 # the input image
    stem: str                   # its output name
    score: float                # larger = more defect-like
    decision: str               # what the model decided ("defect", a class name, ...)
    flagged: bool               # decision is a defect
    label: str | None = None    # the true label, when known
    wrong: bool | None = None   # decision disagrees with the label (defect vs normal)
    overlay: str | None = None  # path of the explanation overlay, relative to the report


def check_report(out: Path, overwrite: bool) -> None:
    """Before any work: a folder that already holds a report keeps it unless --overwrite."""
    if (Path(out) / REPORT).exists() and not overwrite:
        raise UserError(f"{Path(out) / REPORT} already exists (another report): choose another --out or pass "
                        f"--overwrite")


def _rel(path: str) -> str:
    return urllib.parse.quote(path.replace("\\", "/"))


def _savefig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def plot_roc(path: Path, y: np.ndarray, s: np.ndarray, threshold: float | None, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from common.metrics import roc_auc, roc_curve
    fpr, tpr, _ = roc_curve(y, s)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot(fpr, tpr, lw=2, label=f"model (ROC-AUC {roc_auc(y, s):.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="random (0.5)")
    if threshold is not None:
        pred = s > threshold
        ax.plot([(pred & ~y).sum() / max(1, (~y).sum())], [(pred & y).sum() / max(1, y.sum())], "o",
                color="crimson", label=f"threshold {threshold:.4g}")
    ax.set_xlabel("false positive rate (normal images flagged)")
    ax.set_ylabel("true positive rate (defects flagged)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _savefig(fig, path)


def plot_confusion(path: Path, cm: np.ndarray, names: list[str], title: str, xlabel: str = "decision",
                   ylabel: str = "true label") -> None:
    """The confusion matrix with its counts, sized so that 5 class names stay readable."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.4 * n + 2.5, 1.2 * n + 2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), names, rotation=35, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    hi = cm.max() if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if hi and cm[i, j] > hi / 2 else "black")
    fig.tight_layout()
    _savefig(fig, path)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em} .meta{color:#555;margin:.2em 0}
.summary{display:flex;gap:1.5em;flex-wrap:wrap;align-items:flex-start;margin:1em 0}
.summary table td{padding:2px 10px 2px 0} .plots img{max-height:400px;border:1px solid #ddd}
.controls{margin:.8em 0;position:sticky;top:0;background:#fff;padding:.4em 0;z-index:2}
.controls button,.controls select{font-size:1em;margin-right:.6em}
table.rows{border-collapse:collapse} table.rows th,table.rows td{border-bottom:1px solid #ddd;padding:4px 8px;
text-align:left;vertical-align:middle} table.rows th{background:#f4f4f4}
tr.flagged td.decision{color:#b00;font-weight:600} tr.wrong{background:#fff3f0}
td.thumb img{width:140px;height:auto;image-rendering:pixelated} td.map img{height:150px;width:auto}
td.name{font-family:monospace;font-size:.85em;max-width:24em;word-break:break-all}
"""

_SCRIPT = """
const body=document.querySelector('table.rows tbody');
const rows=Array.from(body.rows);
let dir=1;   // the first sort (on load) puts the highest score on top
function apply(){
  const f=document.getElementById('filter').value;let shown=0;
  for(const r of rows){const d=r.dataset;
    const ok=f==='all'||(f==='flagged'&&d.flagged==='1')||(f==='notflagged'&&d.flagged==='0')||(f==='wrong'&&d.wrong==='1');
    r.hidden=!ok;if(ok)shown++;}
  document.getElementById('count').textContent=shown+' of '+rows.length+' images shown';
}
function sortByScore(){
  dir=-dir;rows.sort((a,b)=>dir*(parseFloat(a.dataset.score)-parseFloat(b.dataset.score)));
  for(const r of rows)body.appendChild(r);
  document.getElementById('sortlabel').textContent=dir>0?'score \\u25B2':'score \\u25BC';
}
document.getElementById('filter').addEventListener('change',apply);
document.getElementById('sort').addEventListener('click',sortByScore);
document.getElementById('sortlabel').addEventListener('click',sortByScore);
sortByScore();apply();
"""


def _thumbnail(src: Path, dst: Path) -> None:
    im = load_image(src, "RGB")
    im.thumbnail((THUMB, THUMB), Image.BILINEAR)
    write_quick(dst, png_bytes(np.asarray(im), "JPEG", quality=85))


def write_report(out: Path, rows: list[Row], title: str, threshold: str, summary: dict[str, str],
                 y_defect: np.ndarray | None = None, scores: np.ndarray | None = None,
                 threshold_value: float | None = None, confusion: tuple[np.ndarray, list[str]] | None = None,
                 notes: list[str] = ()) -> Path:
    """Write OUT/report.html and OUT/report_files/ (thumbnails, roc.png, confusion.png).
    `y_defect` / `scores`: true defect flags and scores for the ROC curve (when labels are known);
    `confusion`: (matrix, class names), rows true and columns decided."""
    out = Path(out)
    files = out / FILES
    files.mkdir(parents=True, exist_ok=True)
    plots = []
    if y_defect is not None and scores is not None and y_defect.any() and (~y_defect).any():
        plot_roc(files / "roc.png", y_defect, scores, threshold_value, f"ROC: {title}")
        plots.append(f"{FILES}/roc.png")
    if confusion is not None:
        plot_confusion(files / "confusion.png", np.asarray(confusion[0]), confusion[1], f"confusion: {title}")
        plots.append(f"{FILES}/confusion.png")
    body = []
    for i, r in enumerate(rows):
        thumb = f"{FILES}/{r.stem}.jpg"
        _thumbnail(r.image, out / thumb)
        cls = " ".join(c for c, on in (("flagged", r.flagged), ("wrong", r.wrong)) if on)
        overlay = (f'<a href="{_rel(r.overlay)}"><img loading="lazy" src="{_rel(r.overlay)}" alt="map"></a>'
                   if r.overlay else "")
        body.append(
            f'<tr class="{cls}" data-score="{r.score:.9g}" data-flagged="{int(r.flagged)}" '
            f'data-wrong="{int(bool(r.wrong))}"><td>{i + 1}</td>'
            f'<td class="thumb"><img loading="lazy" src="{_rel(thumb)}" alt="image"></td><td class="map">{overlay}</td>'
            f'<td class="name">{html.escape(str(r.image))}</td><td>{r.score:.4g}</td>'
            f'<td class="decision">{html.escape(r.decision)}</td>'
            f'<td>{html.escape(r.label) if r.label is not None else "&ndash;"}</td></tr>')
    n_flag = sum(r.flagged for r in rows)
    n_wrong = sum(bool(r.wrong) for r in rows)
    wrong_text = f", {n_wrong} wrong" if any(r.wrong is not None for r in rows) else ""
    stats = "".join(f"<tr><td>{html.escape(k)}</td><td><b>{html.escape(v)}</b></td></tr>" for k, v in summary.items())
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>Review: {html.escape(title)}</h1>
<p class="meta">{len(rows)} images, {n_flag} flagged as defect{wrong_text}.
Threshold: <b>{html.escape(threshold)}</b></p>
{"".join(f'<p class="meta">{html.escape(n)}</p>' for n in notes)}
<div class="summary"><table>{stats}</table>
<div class="plots">{" ".join(f'<img src="{p}" alt="{Path(p).stem}">' for p in plots)}</div></div>
<div class="controls"><button id="sort">sort by score</button>
<label>show <select id="filter"><option value="all">all</option><option value="flagged">flagged</option>
<option value="notflagged">not flagged</option><option value="wrong">wrong</option></select></label>
<span id="count"></span></div>
<table class="rows"><thead><tr><th>#</th><th>image</th><th>map</th><th>file</th>
<th id="sortlabel" style="cursor:pointer">score</th><th>decision</th><th>true label</th></tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table>
<script>{_SCRIPT}</script>
</body></html>
"""
    atomic_write_text(out / REPORT, doc)
    return out / REPORT

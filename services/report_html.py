"""``cityfuse evaluate ... --html report.html``: one self-contained HTML file (inline CSS,
SVG and base64 media; nothing fetched) with the confusion matrix, per class and per
modality scores, the ablation, a latency histogram and the misclassified incidents with
their evidence. Every text from the data goes through ``html.escape``."""

from __future__ import annotations

import base64
import io
import json
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from streams.recording import RecordedEvent, read_recording
from streams.taxonomy import labels

MAX_MISSES = 40  # incidents listed with their evidence
THUMB_PX = 220
AUDIO_MAX_BYTES = 400_000

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}th,td{padding:3px 8px;border:1px solid #e1e4e8;
text-align:right}th{background:#f3f5f7}td.l,th.l{text-align:left}
.cm td{width:54px;text-align:center}.miss{border:1px solid #e1e4e8;padding:8px;margin:10px 0}
.ev{display:inline-block;vertical-align:top;margin:4px;max-width:360px}.ev p{white-space:pre-wrap}
.muted{color:#777}.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:4px}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return escape(str(v))


def _table(head: list[str], rows: list[list[Any]], cls: str = "") -> str:
    out = [f'<table class="{cls}"><tr>']
    out += [f'<th class="{"l" if i == 0 else ""}">{escape(h)}</th>' for i, h in enumerate(head)]
    out.append("</tr>")
    for r in rows:
        cells = [f'<td class="{"l" if i == 0 else ""}">{_fmt(c)}</td>' for i, c in enumerate(r)]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def confusion_html(y_true: list[str], y_pred: list[str]) -> str:
    """Confusion matrix as a shaded table (rows = truth, columns = prediction)."""
    names = [lab.name for lab in labels()]
    cols = names + (["missing"] if "missing" in y_pred else [])
    counts = {(t, p): 0 for t in names for p in cols}
    for t, p in zip(y_true, y_pred, strict=True):
        if (t, p) in counts:
            counts[(t, p)] += 1
    top = max(counts.values()) or 1
    out = ['<table class="cm"><tr><th class="l">truth \\ predicted</th>']
    out += [f"<th>{escape(c)}</th>" for c in cols]
    out.append("</tr>")
    for t in names:
        out.append(f'<tr><th class="l">{escape(t)}</th>')
        for p in cols:
            n = counts[(t, p)]
            alpha = 0.08 + 0.8 * n / top if n else 0.0
            colour = "46,134,193" if t == p else "192,57,43"
            out.append(f'<td style="background:rgba({colour},{alpha:.2f})">{n or ""}</td>')
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def histogram_svg(values: list[float], bins: int = 24, unit: str = "ms") -> str:
    """A histogram drawn as inline SVG, with p50/p95 marked."""
    if not values:
        return '<p class="muted">no latencies (run with --via-kafka)</p>'
    arr = np.asarray(values, dtype=float)
    counts, edges = np.histogram(arr, bins=bins)
    w, h, pad = 720, 220, 36
    bw = (w - 2 * pad) / bins
    top = counts.max() or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">']
    for i, c in enumerate(counts):
        bh = (h - 2 * pad) * c / top
        parts.append(
            f'<rect x="{pad + i * bw:.1f}" y="{h - pad - bh:.1f}" width="{bw - 1:.1f}" '
            f'height="{bh:.1f}" fill="#34495e"><title>{edges[i]:.0f}–{edges[i + 1]:.0f} {unit}: '
            f"{c}</title></rect>"
        )
    lo, hi = edges[0], edges[-1]
    for q, colour in ((50, "#27ae60"), (95, "#c0392b")):
        v = float(np.percentile(arr, q))
        x = pad + (v - lo) / ((hi - lo) or 1) * (w - 2 * pad)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{pad - 8}" y2="{h - pad}" stroke="{colour}"/>'
            f'<text x="{x + 3:.1f}" y="{pad - 10}" font-size="11" fill="{colour}">'
            f"p{q} {v:.0f} {unit}</text>"
        )
    parts.append(
        f'<line x1="{pad}" x2="{w - pad}" y1="{h - pad}" y2="{h - pad}" stroke="#555"/>'
        f'<text x="{pad}" y="{h - 12}" font-size="11">{lo:.0f} {unit}</text>'
        f'<text x="{w - pad}" y="{h - 12}" font-size="11" text-anchor="end">{hi:.0f} {unit}</text>'
        f'<text x="{w / 2}" y="{h - 12}" font-size="11" text-anchor="middle">'
        f"ingest → alert latency, {len(arr)} alert versions</text></svg>"
    )
    return "".join(parts)


def _thumb(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        rgb.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=75)
    except (OSError, ValueError):
        return None
    return base64.b64encode(buf.getvalue()).decode("ascii")


def evidence_html(ev: RecordedEvent, folder: Path) -> str:
    """One recorded event inline: a frame thumbnail, the call audio, or the report text."""
    msg = ev.message
    head = escape(
        f"{msg.get('event_id', '?')} · {ev.topic} · truth {(ev.truth or {}).get('label')}"
    )
    body = ""
    media = msg.get("media") if isinstance(msg.get("media"), dict) else None
    path = (folder / str(media["path"])).resolve() if media and "path" in media else None
    if path is not None and folder.resolve() not in path.parents:
        path = None  # never read outside the recording
    if "text" in msg:
        body = f"<p>{escape(str(msg['text']))}</p>"
    elif path is not None and ev.topic.endswith("frames"):
        b64 = _thumb(path)
        body = f'<img alt="frame" src="data:image/jpeg;base64,{b64}">' if b64 else "(unreadable)"
    elif path is not None and path.exists() and path.stat().st_size <= AUDIO_MAX_BYTES:
        ctype = escape(str(media.get("content_type") or "audio/ogg")) if media else "audio/ogg"
        b64 = base64.b64encode(path.read_bytes()).decode("ascii")
        body = f'<audio controls src="data:{ctype};base64,{b64}"></audio>'
    elif path is not None:
        body = '<p class="muted">audio too large to inline</p>'
    return f'<div class="ev"><div class="muted">{head}</div>{body}</div>'


def misses_html(
    rows: list[Any], keys: list[str], y_true: list[str], y_pred: list[str], folder: Path
) -> str:
    """The misclassified incidents, each with its evidence from the recording."""
    _, events = read_recording(folder)
    by_id = {str(e.message.get("event_id")): e for e in events}
    members: dict[str, list[str]] = {}
    for r in rows:
        if r.key is not None:
            members.setdefault(r.key, []).append(r.event_id)
    wrong = [(k, t, p) for k, t, p in zip(keys, y_true, y_pred, strict=True) if t != p]
    if not wrong:
        return "<p>No misclassified incident.</p>"
    out = [f"<p>{len(wrong)} of {len(keys)} incidents misclassified"]
    if len(wrong) > MAX_MISSES:
        out.append(f" (first {MAX_MISSES} shown)")
    out.append("</p>")
    for key, truth, pred in wrong[:MAX_MISSES]:
        out.append(
            f'<div class="miss"><b>{escape(key)}</b>: truth <b>{escape(truth)}</b>, '
            f"predicted <b>{escape(pred)}</b><br>"
        )
        out += [evidence_html(by_id[e], folder) for e in members.get(key, []) if e in by_id]
        out.append("</div>")
    return "".join(out)


def ablation_html(ablation: Any) -> str:
    """The ablation as a table when it is {setting: {metric: value}}, else as JSON."""
    if (
        isinstance(ablation, dict)
        and ablation
        and all(isinstance(v, dict) for v in ablation.values())
    ):
        metrics = sorted(
            {k for v in ablation.values() for k, x in v.items() if not isinstance(x, (dict, list))}
        )
        rows = [[name, *(v.get(m, "") for m in metrics)] for name, v in ablation.items()]
        return _table(["setting", *metrics], rows)
    return f"<pre>{escape(json.dumps(ablation, indent=2))}</pre>"


def render(
    result: dict[str, Any],
    name: str,
    y_true: list[str],
    y_pred: list[str],
    misses: str,
    latencies_ms: list[float],
) -> str:
    """The whole report as one HTML string."""
    inc = result["incidents"]
    legend = " ".join(
        f'<span><span class="dot" style="background:{escape(lab.colour)}"></span>'
        f"{escape(lab.name)}</span>"
        for lab in labels()
    )
    per_mod = [[m, v["n"], v["accuracy"], v["macro_f1"]] for m, v in result["per_modality"].items()]
    per_mod.append(["incidents (fused)", inc["n"], inc["accuracy"], inc["macro_f1"]])
    per_class = [
        [lab, v["precision"], v["recall"], v["f1"], v["support"]]
        for lab, v in result["per_class"].items()
    ]
    ablation = result.get("ablation")
    dlq = result.get("dlq", {})
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>CityFuse evaluation: {escape(name)}</title><style>{CSS}</style></head><body>
<h1>CityFuse evaluation: {escape(name)}</h1>
<p>{result["events"]} events, {inc["n"]} incidents; incident accuracy <b>{inc["accuracy"]:.3f}</b>,
macro-F1 <b>{inc["macro_f1"]:.3f}</b>. Dead letters: {escape(str(dlq.get("count", 0)))}
{escape(json.dumps(dlq.get("by_reason", {})))}.</p>
<p>{legend}</p>
<h2>Confusion matrix (incidents)</h2>{confusion_html(y_true, y_pred)}
<h2>Per modality</h2>{_table(["scope", "n", "accuracy", "macro-F1"], per_mod)}
<h2>Per class (incidents)</h2>{_table(["label", "precision", "recall", "F1", "support"], per_class)}
<h2>Ablation</h2>{ablation_html(ablation) if ablation is not None else '<p class="muted">no ablation in these metrics</p>'}
<h2>Latency</h2>{histogram_svg(latencies_ms)}
<h2>Misclassified incidents</h2>{misses}
</body></html>
"""


def write_report(
    path: Path,
    result: dict[str, Any],
    rows: list[Any],
    y_true: list[str],
    y_pred: list[str],
    folder: Path,
    latencies_ms: list[float],
) -> None:
    """Write the report for an evaluation (``rows`` are services.evaluate's Rows)."""
    from services.evaluate import _group_truth

    keys = sorted(_group_truth(rows))
    if len(keys) == len(y_true):
        misses = misses_html(rows, keys, y_true, y_pred, folder)
    else:  # scored on other keys than the rows' own (should not happen): say so
        misses = '<p class="muted">incident keys unavailable for this run</p>'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(result, folder.name, y_true, y_pred, misses, latencies_ms))

"""`factory report --html`: one self-contained HTML file (plots and thumbnails as data: URIs).

No external URL anywhere, so the file can be mailed or opened offline. Captions are HTML text
under each image (searchable, copyable), not drawn into the pixels. A tiny inline script marks
<body data-images-ok="N" data-images-total="M"> once the page has loaded, which the headless
browser test reads back.
"""

from __future__ import annotations

import base64
import html
import logging
from typing import Any

from . import report_plots as plots
from .fallbacks import report_line

log = logging.getLogger(__name__)

#: Every section of the page, in order (the browser test checks each one is rendered).
SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Summary"),
    ("funnel", "Acceptance funnel by stage"),
    ("rejections", "Rejections by reason"),
    ("au-occurrence", "Per-AU occurrence vs plan"),
    ("au-intensity", "Per-AU intensity histograms vs plan"),
    ("cooccurrence", "AU co-occurrence"),
    ("balance", "Emotion x demographic balance"),
    ("throughput", "Throughput over time per node"),
    ("failed", "Failed shards"),
    ("samples-accepted", "Accepted samples"),
    ("samples-rejected", "Rejected samples"),
)

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1280px;color:#1a202c}
h1{font-size:22px;margin-bottom:4px}
h2{font-size:17px;border-bottom:1px solid #e2e8f0;padding-bottom:4px;margin-top:28px}
.muted{color:#718096} .plot{max-width:100%;height:auto;display:block}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #e2e8f0;padding:3px 8px;text-align:right}
th{background:#f7fafc} td.l,th.l{text-align:left}
.err{font-family:monospace;white-space:pre-wrap;text-align:left;font-size:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:12px}
.card{border:1px solid #e2e8f0;border-radius:6px;padding:6px;margin:0;font-size:12px;background:#fff}
.card img{width:160px;height:160px;image-rendering:pixelated;display:block;margin:0 auto 4px;cursor:zoom-in}
.card img:focus{position:fixed;top:50%;left:50%;transform:translate(-50%,-50%);width:min(88vw,88vh,640px);
 height:auto;z-index:10;cursor:zoom-out;outline:none;box-shadow:0 0 0 100vmax rgba(0,0,0,.6)}
.card .key{font-family:monospace;font-size:11px;color:#4a5568} .card .prompt{font-style:italic;margin:3px 0}
.au{display:inline-block;background:#edf2f7;border-radius:3px;padding:0 4px;margin:1px;font-size:11px}
.au.on{background:#2b6cb0;color:#fff} .reason{font-weight:600;color:#c05621}
.noimg{width:160px;height:60px;margin:0 auto 4px;display:flex;align-items:center;justify-content:center;
 background:#f7fafc;color:#a0aec0;font-size:11px;border:1px dashed #cbd5e0;text-align:center}
.note{background:#fffbea;border-left:3px solid #d69e2e;padding:4px 8px;margin:4px 0}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-ok', String(ok));
});
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _img(png: bytes, alt: str) -> str:
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    return f'<img class="plot" alt="{_e(alt)}" src="{uri}">'


def _table(head: list[str], rows: list[list[Any]], left: int = 1) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{_e(c)}</td>' for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{th}</tr>{body}</table>"


def _summary(rep: dict[str, Any]) -> str:
    sh, thr = rep["shards"], rep["throughput"]
    speed = thr["samples_per_s"]
    rate = rep["acceptance_rate"]
    rows = [
        ["accepted samples", f"{rep['accepted']:,} of {rep['target']:,} planned"],
        ["shards", f"{sh['done']} done, {sh['failed']} failed, {sh['pending']} pending of {sh['total']}"],
        ["candidates", f"{rep['candidates']:,}" + (f" (kept {rate:.1%})" if rate is not None else "")],
        ["prompts", report_line(rep["expand"])],
        ["throughput", f"{speed:.1f} samples/s over {thr['wall_s']:.1f} s with shards running" if speed else "-"],
    ]
    out = _table(["", ""], rows)
    if sh["pending"]:
        out += '<p class="note">Build not finished: figures cover the committed shards only.</p>'
    for note in rep.get("notes", []):
        out += f'<p class="note">{_e(note)}</p>'
    if rep.get("partial_emotions"):
        items = "".join(f"<li><b>{_e(e)}</b>: {_e(n)}</li>" for e, n in rep["partial_emotions"].items())
        out += f'<p class="muted">Emotions only partly expressible with the 12 AUs:</p><ul class="muted">{items}</ul>'
    return out


def _failed(rep: dict[str, Any]) -> str:
    if not rep["failed"]:
        return '<p class="muted">No failed shards.</p>'
    rows = "".join(
        f'<tr><td class="l">{_e(k)}</td><td class="err">{_e(v)}</td></tr>' for k, v in sorted(rep["failed"].items())
    )
    return (
        f'<table><tr><th class="l">shard</th><th class="l">last error</th></tr>{rows}</table>'
        f'<p class="muted">`factory resume {_e(rep["out"])}` retries them.</p>'
    )


def _card(s: dict[str, Any], head: str = "") -> str:
    """One sample: its image, then key, emotion and identity, prompt, AU labels and scores as text under it."""
    img = (
        # focusable: a click shows the face at up to 640 px over the page (CSS only), another click anywhere closes it
        f'<img tabindex="0" title="click to enlarge" alt="{_e(s["key"])}" src="{s["image"]}">'
        if s.get("image")
        else f'<div class="noimg">{_e(s.get("no_image", "no image"))}</div>'
    )
    aus = (
        "".join(
            f'<span class="au{" on" if a["occurs"] else ""}">{_e(a["au"])} {a["intensity"]:.1f}</span>'
            for a in s["aus"]
        )
        or '<span class="muted">no AU active</span>'
    )
    scores = ", ".join(f"{k} {v:.2f}" for k, v in s.get("scores", {}).items())
    who = ""
    if s.get("emotion") is not None:
        who = (
            f"<div><b>{_e(s['emotion'])}</b> (strength {_e(s['strength'])}) &middot; skin {_e(s['skin_group'])}"
            f" &middot; {_e(s['age_group'])}</div>"
        )
    prompt = f'<div class="prompt">&ldquo;{_e(s["prompt"])}&rdquo;</div>' if s.get("prompt") else ""
    return (
        f'<figure class="card">{img}<figcaption>{head}'
        f'<div class="key">{_e(s["key"])}</div>{who}{prompt}'
        f"<div>{aus}</div>"
        f'<div class="muted">{_e(scores)}</div>'
        "</figcaption></figure>"
    )


def _accepted_cards(samples: list[dict[str, Any]]) -> str:
    if not samples:
        return '<p class="muted">No committed samples yet.</p>'
    return (
        '<p class="muted">Labels: AU intensity (0-5); filled = occurring. From the head of evenly spaced '
        "committed shards.</p>"
        f'<div class="grid">{"".join(_card(s) for s in samples)}</div>'
    )


def _rejected_cards(samples: list[dict[str, Any]], note: str) -> str:
    if not samples:
        return '<p class="muted">No rejected samples recorded.</p>'
    cards = []
    for s in samples:
        inj = f"<div>injected fault: <b>{_e(', '.join(s['injected']))}</b></div>" if s["injected"] else ""
        head = f'<div class="reason">{_e(s["reason"])}</div><div class="muted">shard {_e(s["shard"])}</div>{inj}'
        cards.append(_card(s, head))
    return f'<p class="note">{_e(note)}</p><div class="grid">{"".join(cards)}</div>'


def render_html(rep: dict[str, Any]) -> str:
    """The report as one HTML document."""
    f = rep["figures"]
    bal, occ = f["balance"], f["au_occurrence"]
    body = {
        "summary": _summary(rep),
        "funnel": _img(plots.funnel(f["funnel"]["stages"], f["funnel"]["counts"]), "acceptance funnel"),
        "rejections": _img(plots.rejections(f["rejections"]["reasons"], f["rejections"]["counts"]), "rejections"),
        "au-occurrence": _img(
            plots.au_occurrence(occ["aus"], occ["observed"], occ["planned"]),
            "AU occurrence",
        )
        + f'<p class="muted">Over {f["au_occurrence"]["rows"]:,} accepted samples; planned = their target AUs.</p>',
        "au-intensity": _img(
            plots.au_intensity(f["au_intensity"]["aus"], f["au_intensity"]["labels"], f["au_intensity"]["planned"]),
            "AU intensity histograms",
        ),
        "cooccurrence": _img(
            plots.cooccurrence(f["cooccurrence"]["aus"], f["cooccurrence"]["conditional"]), "AU co-occurrence heatmap"
        ),
        "balance": _img(
            plots.balance(
                bal["emotions"],
                [
                    (
                        "skin group",
                        bal["skin_groups"]["groups"],
                        bal["skin_groups"]["accepted"],
                        bal["skin_groups"]["planned"],
                    ),
                    (
                        "age group",
                        bal["age_groups"]["groups"],
                        bal["age_groups"]["accepted"],
                        bal["age_groups"]["planned"],
                    ),
                ],
            ),
            "emotion x demographic balance",
        ),
        "throughput": _img(plots.throughput(f["throughput"]["nodes"]), "throughput per node")
        + _table(
            ["node", "shards", "samples", "shard-seconds"],
            [[k, v["shards"], v["samples"], f"{v['busy_s']:.1f}"] for k, v in rep["throughput"]["nodes"].items()],
        ),
        "failed": _failed(rep),
        "samples-accepted": _accepted_cards(rep["samples"]["accepted"]),
        "samples-rejected": _rejected_cards(rep["samples"]["rejected"], rep["samples"]["rejected_note"]),
    }
    sections = "".join(f'<section id="{sid}"><h2>{_e(title)}</h2>{body[sid]}</section>' for sid, title in SECTIONS)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>MIFA build {_e(rep['build_id'])}</title><style>{CSS}</style><script>{SCRIPT}</script></head>"
        f'<body><h1>MIFA build report</h1><p class="muted">{_e(rep["out"])} &middot; build {_e(rep["build_id"])}</p>'
        f"{sections}</body></html>"
    )


def write_html(rep: dict[str, Any], path: str) -> int:
    """Render and write the report through fsspec (a local path or s3://...); returns its size in bytes."""
    import fsspec

    data = render_html(rep).encode()
    with fsspec.open(path, "wb") as fh:
        fh.write(data)
    log.info("wrote %s (%.1f kB)", path, len(data) / 1e3)
    return len(data)

"""Pages and terminal text that show per-token TPO weights: pure functions of the token views, no torch.

A token is coloured by its weight ``c`` (docs/method.md §3) on a diverging map around 1: blue below (the token
counts less), white at 1 (as in DPO), red above (it counts more); its visual score ``s`` shows on hover.
Everything is inline (CSS, SVG, images as base64 PNG), so a page opens without network.
"""

import base64
import html
import io
import json
from collections import defaultdict
from typing import Any, Iterable, Optional

from PIL import Image


SIDES = ("chosen", "rejected")
WEIGHT_SPAN = 0.5  # |c - 1| that gets the full colour: c lies in (a, a + 1), (0.5, 1.5) with the default a

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px;text-align:left}
.pair{border-top:2px solid #888;padding:12px 0;display:flex;gap:18px}.pair img{max-width:224px;height:auto}
.tok{padding:1px 0;border-radius:3px;white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:14px}
.answer{margin:6px 0;line-height:1.9}.label{font-weight:bold;margin-right:6px}.note{color:#555;font-size:13px}
.video{margin:6px 0}.frames{display:flex;gap:2px;align-items:center}.frames img{max-width:96px}
"""


def weight_colour(weight: float) -> str:
    """CSS colour of a token weight: blue below 1, white at 1, red above (saturating at 1 ± WEIGHT_SPAN)."""
    amount = max(-1.0, min(1.0, (weight - 1.0) / WEIGHT_SPAN))
    fade = round(255 * (1 - abs(amount)))
    return f"rgb(255,{fade},{fade})" if amount >= 0 else f"rgb({fade},{fade},255)"


def image_data_uri(source: str | Image.Image, size: int = 224) -> str:
    """An image (a file, or an image) as a base64 PNG data URI, at most ``size`` pixels on its longer side."""
    image = (Image.open(source) if isinstance(source, str) else source).convert("RGB")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def summary(views: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean s and c per side, tokens ranked by mean weight per side, and the largest policy/reference gaps."""
    result = {}
    for side in SIDES:
        scores = [s for view in views for s in view[side]["visual_score"]]
        weights = [c for view in views for c in view[side]["weight"]]
        by_token = defaultdict(list)
        for view in views:
            for token, weight in zip(view[side]["tokens"], view[side]["weight"], strict=True):
                by_token[token].append(weight)
        ranked = sorted(((_mean(ws), token, len(ws)) for token, ws in by_token.items()), reverse=True)
        result[side] = {"mean_score": _mean(scores), "mean_weight": _mean(weights), "tokens_by_weight": ranked}
    gaps = [
        (abs(c - ref_c), view["pair"], side, token, c, ref_c)
        for view in views
        for side in SIDES
        for token, c, ref_c in zip(
            view[side]["tokens"], view[side]["weight"], view[side]["reference"]["weight"], strict=True
        )
    ]
    result["disagreements"] = sorted(gaps, reverse=True)[:10]
    return result


def histogram_svg(values: list[float], colour: str, bins: int = 20, width: int = 320, height: int = 120) -> str:
    """An inline SVG histogram of ``values`` with its range written under it."""
    if not values:
        return "<p class='note'>no tokens</p>"
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, int((value - low) / span * bins))] += 1
    bar_width, top = width / bins, max(counts)
    bars = "".join(
        f"<rect x='{i * bar_width:.1f}' y='{height - 20 - (n / top) * (height - 30):.1f}' width='{bar_width - 1:.1f}' "
        f"height='{(n / top) * (height - 30):.1f}' fill='{colour}'><title>{n}</title></rect>"
        for i, n in enumerate(counts)
    )
    labels = (
        f"<text x='0' y='{height - 5}' font-size='11'>{low:.3g}</text>"
        f"<text x='{width}' y='{height - 5}' font-size='11' text-anchor='end'>{high:.3g}</text>"
    )
    return f"<svg width='{width}' height='{height}'>{bars}{labels}</svg>"


def _token_spans(side: dict[str, Any]) -> str:
    reference = side["reference"]
    spans = []
    for token, s, c, logp, ref_s, ref_c in zip(
        side["tokens"], side["visual_score"], side["weight"], side["logp"],
        reference["visual_score"], reference["weight"], strict=True,
    ):  # fmt: skip
        title = f"s={s:.4f}  c={c:.4f}  log p={logp:.4f} | reference: s={ref_s:.4f}  c={ref_c:.4f}"
        spans.append(
            f"<span class='tok' style='background:{weight_colour(c)}' title='{html.escape(title)}'>"
            f"{html.escape(token)}</span>"
        )
    return "".join(spans)


def _token_table(ranked: list[tuple[float, str, int]]) -> str:
    rows = "".join(
        f"<tr><td><code>{html.escape(repr(token))}</code></td><td>{weight:.3f}</td><td>{count}</td></tr>"
        for weight, token, count in ranked
    )
    return f"<table><tr><th>token</th><th>mean c</th><th>n</th></tr>{rows}</table>"


def report_html(
    views: list[dict[str, Any]],
    title: str,
    notes: list[str],
    images: dict[int, list[str]],
    videos: Optional[dict[int, list[tuple[list[str], list[str]]]]] = None,
) -> str:
    """The inspection page: summary, histograms, then each pair's image(s), question and coloured answers.

    ``views`` are ``tokens.jsonl`` records (plus ``question``); ``images[pair]`` are data URIs; ``videos[pair]``
    holds per video a strip of its frames as the model sees them and one of their corrupted copies (data URIs).
    """
    videos = videos or {}
    stats = summary(views)
    parts = [f"<h1>{html.escape(title)}</h1>", *(f"<p class='note'>{html.escape(note)}</p>" for note in notes)]
    parts.append(
        "<p class='note'>Colour: token weight c, <span class='tok' style='background:"
        f"{weight_colour(1 - WEIGHT_SPAN)}'>&nbsp;c ≤ {1 - WEIGHT_SPAN}&nbsp;</span> … "
        f"<span class='tok' style='background:#fff;border:1px solid #ccc'>&nbsp;1&nbsp;</span> … "
        f"<span class='tok' style='background:{weight_colour(1 + WEIGHT_SPAN)}'>&nbsp;c ≥ {1 + WEIGHT_SPAN}&nbsp;"
        "</span>; hover a token for its visual score s, c and log p (policy and reference).</p>"
    )
    rows = "".join(
        f"<tr><td>{side}</td><td>{stats[side]['mean_score']:.4f}</td><td>{stats[side]['mean_weight']:.4f}</td>"
        f"<td>{histogram_svg([s for v in views for s in v[side]['visual_score']], colour)}</td></tr>"
        for side, colour in zip(SIDES, ("#2a9d4b", "#c43c3c"), strict=True)
    )
    parts.append(f"<h2>Summary over {len(views)} pairs (policy)</h2>")
    parts.append(f"<table><tr><th>side</th><th>mean s</th><th>mean c</th><th>histogram of s</th></tr>{rows}</table>")
    for side in SIDES:
        ranked = stats[side]["tokens_by_weight"]
        parts.append(f"<h2>{side}: largest and smallest mean weight</h2>")
        parts.append(f"<div style='display:flex;gap:24px'>{_token_table(ranked[:8])}{_token_table(ranked[-8:])}</div>")
    gap_rows = "".join(
        f"<tr><td>{pair}</td><td>{side}</td><td><code>{html.escape(repr(token))}</code></td>"
        f"<td>{c:.4f}</td><td>{ref_c:.4f}</td></tr>"
        for _, pair, side, token, c, ref_c in stats["disagreements"]
    )
    parts.append("<h2>Where policy and reference disagree most (|c − c_ref|)</h2>")
    parts.append(f"<table><tr><th>pair</th><th>side</th><th>token</th><th>c</th><th>c_ref</th></tr>{gap_rows}</table>")
    parts.append("<h2>Pairs</h2>")
    for view in views:
        pictures = "".join(f"<img src='{uri}' alt='pair {view['pair']}'>" for uri in images.get(view["pair"], []))
        pictures += "".join(
            _frame_strips(view["pair"], number, strips) for number, strips in enumerate(videos.get(view["pair"], []))
        )
        answers = "".join(
            f"<div class='answer'><span class='label'>{side}</span>{_token_spans(view[side])}</div>" for side in SIDES
        )
        parts.append(
            f"<div class='pair' id='pair-{view['pair']}'><div>{pictures}</div><div><b>pair {view['pair']}</b>"
            f"<p>{html.escape(view.get('question', ''))}</p>{answers}</div></div>"
        )
    return _page(title, "".join(parts))


def _frame_strips(pair: int, number: int, strips: tuple[list[str], list[str]]) -> str:
    """One video of a pair: its frames in a row, and their corrupted copies in the row below."""
    rows = "".join(
        f"<div class='frames'><span class='label'>{label}</span>"
        + "".join(
            f"<img src='{uri}' alt='pair {pair}, video {number}, {label} frame {index}'>"
            for index, uri in enumerate(frames)
        )
        + "</div>"
        for label, frames in zip(("clean", "corrupted"), strips, strict=True)
    )
    return f"<div class='video'>{rows}</div>"


def _page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>\n"
    )


def read_token_log(text: str) -> tuple[list[dict[str, Any]], list[int]]:
    """The records of a ``tpo_tokens.jsonl`` text, and the numbers of its lines that hold none (e.g. the last
    line, cut off by a crash while it was written)."""
    records, unreadable = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if _is_token_record(record):
            records.append(record)
        else:
            unreadable.append(number)
    return records, unreadable


def _is_token_record(record: Any) -> bool:
    """Whether ``record`` has the fields and types ``history_html`` reads (tokens, s and c of equal length)."""
    if not isinstance(record, dict):
        return False
    numbers, lists = ("step", "pair"), ("tokens", "visual_score", "weight")
    if not all(type(record.get(key)) is int for key in numbers) or not isinstance(record.get("side"), str):
        return False
    if not all(isinstance(record.get(key), list) for key in lists):
        return False
    tokens, scores, weights = (record[key] for key in lists)
    return (
        len(tokens) == len(scores) == len(weights)
        and all(isinstance(token, str) for token in tokens)
        and all(type(value) in (int, float) for value in scores + weights)
    )


def records_of_the_current_run(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``tpo_tokens.jsonl``'s records (in file order) as the run stands now, without those a resume replaced.

    The file is only appended to; a run resumed from a checkpoint logs again from the steps after it, so a record
    that repeats a logged (step, pair, side) or comes before the last logged step starts the resumed part: the
    records from its step on, before it, belong to the part that was abandoned (as in the trainer's log history,
    which the checkpoint restores). A new run into the same ``output_dir`` starts a new file.
    """
    kept: list[dict[str, Any]] = []
    logged = set()
    for record in records:
        key = (record["step"], record["pair"], record["side"])
        if kept and (key in logged or record["step"] < kept[-1]["step"]):
            kept = [earlier for earlier in kept if earlier["step"] < record["step"]]
            logged = {(earlier["step"], earlier["pair"], earlier["side"]) for earlier in kept}
        kept.append(record)
        logged.add(key)
    return kept


def history_html(records: list[dict[str, Any]], title: str, notes: list[str]) -> str:
    """``tpo_tokens.jsonl`` as a page: per pair and side, one row of coloured token weights per logged step,
    and the mean weight per step, so a drift (e.g. every chosen token becoming image-dependent) shows.

    ``records`` come from a file: :func:`read_token_log` checked that their numbers are numbers, and every string
    from them is escaped here."""
    series = defaultdict(list)
    for record in records:
        series[(record["pair"], record["side"])].append(record)
    parts = [f"<h1>{html.escape(title)}</h1>", *(f"<p class='note'>{html.escape(note)}</p>" for note in notes)]
    parts.append("<p class='note'>Rows: logging steps; colour: weight c (blue &lt; 1 &lt; red); hover: s and c.</p>")
    for (pair, side), steps in sorted(series.items()):
        parts.append(f"<h2>pair {pair}, {html.escape(side)}</h2>")
        parts.append("<table><tr><th>step</th><th>mean s</th><th>mean c</th><th>tokens</th></tr>")
        for record in sorted(steps, key=lambda r: r["step"]):
            spans = "".join(
                f"<span class='tok' style='background:{weight_colour(c)}' "
                f"title='{html.escape(f's={s:.4f}  c={c:.4f}')}'>{html.escape(token)}</span>"
                for token, s, c in zip(record["tokens"], record["visual_score"], record["weight"], strict=True)
            )
            parts.append(
                f"<tr><td>{record['step']}</td><td>{_mean(record['visual_score']):.4f}</td>"
                f"<td>{_mean(record['weight']):.4f}</td><td>{spans}</td></tr>"
            )
        parts.append("</table>")
    return _page(title, "".join(parts))


def terminal_view(views: list[dict[str, Any]], colour: bool, max_pairs: int = 3) -> str:
    """The first pairs' answers, each token on a background coloured by its weight (or ``token[c]`` without
    colour), and the mean s and c of each side."""
    lines = []
    for view in views[:max_pairs]:
        lines.append(f"pair {view['pair']}: {' '.join(view.get('question', '').split())}")  # the prompt on one line
        for side in SIDES:
            data = view[side]
            if colour:
                text = "".join(
                    _ansi_background(weight_colour(c)) + token + "\033[0m"
                    for token, c in zip(data["tokens"], data["weight"], strict=True)
                )
            else:
                text = " ".join(f"{token!r}[{c:.2f}]" for token, c in zip(data["tokens"], data["weight"], strict=True))
            lines.append(
                f"  {side:8s} mean s={_mean(data['visual_score']):+.3f} c={_mean(data['weight']):.3f}  {text}"
            )
    return "\n".join(lines)


def _ansi_background(css_rgb: str) -> str:
    red, green, blue = (int(part) for part in css_rgb[4:-1].split(","))
    return f"\033[48;2;{red};{green};{blue}m\033[38;2;0;0;0m"

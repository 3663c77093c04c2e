"""The report's gallery as HTML: a card per sampled video, with its stills and parameters."""

from __future__ import annotations

from jobs import params
from jobs.products.report.gather import Gathered
from jobs.products.report.text import esc, num


def _params_list(row: dict) -> str:
    items = [("id", f"<code>{esc(row.get('id'))}</code>")]
    if row.get("score") is not None:
        items.append(("score", f"<b>{esc(num(row['score']))}</b>"))
    for name in params.NAMES:
        value = row.get(name)
        if value is not None:
            items.append((name, esc(value if name in ("seed", "negative_prompt")
                                    else num(value))))
    return ("<ul class=\"params\">"
            + "".join(f"<li><span class=\"k\">{esc(k)}</span> {v}</li>" for k, v in items)
            + "</ul>")


def gallery(g: Gathered) -> str:
    rows = g.sample()
    head = "<section id=\"gallery\"><h2>Gallery</h2>\n"
    if not rows:
        why = "No videos." if not g.ok else "No sample asked for (sample size 0)."
        return head + f"<p class=\"muted\">{why}</p></section>\n"
    shown = (f"all {g.ok:,} videos" if len(rows) == g.ok else
             f"{len(rows):,} of {g.ok:,} videos, a fixed sample (the rows with the smallest "
             f"hash of their id)")
    scored = any(r["score"] is not None for r in rows)
    buttons = ("<p>Sort: <button type=\"button\" data-sort=\"row\" data-dir=\"1\" "
               "aria-pressed=\"true\">row order</button>"
               + ("<button type=\"button\" data-sort=\"score\" data-dir=\"1\" "
                  "aria-pressed=\"false\">score \u2191</button><button type=\"button\" "
                  "data-sort=\"score\" data-dir=\"-1\" aria-pressed=\"false\">score \u2193"
                  "</button>" if scored else " <span class=\"muted\">(no scores)</span>")
               + "</p>\n")
    cards = []
    for row in rows:
        media = row["media"]
        score = "" if row["score"] is None else repr(row["score"])
        if media["video"]:
            poster = f" poster=\"{esc(media['preview'])}\"" if media["preview"] else ""
            preload = "none" if media["preview"] else "metadata"
            player = (f"<video controls loop muted playsinline preload=\"{preload}\"{poster} "
                      f"src=\"{esc(media['video'])}\"></video>")
            link = f"<p><a href=\"{esc(media['video'])}\">open video</a></p>"
        else:
            player, link = "<p class=\"muted\">(no playable link)</p>", ""
        stills = _stills(media)
        video = (f"<div class=\"pair\">{stills}{player}</div>" if stills else player) + link
        cards.append(f"<figure class=\"card\" data-row=\"{int(row['row_index'])}\" "
                     f"data-score=\"{esc(score)}\">{video}<figcaption>"
                     f"<p class=\"prompt\"><bdi>{esc(row.get('prompt'))}</bdi></p>"
                     f"{_params_list(row)}</figcaption></figure>\n")
    return (head + f"<p>{shown}. Click a video to play it.</p>\n{buttons}<div id=\"grid\">\n"
            + "".join(cards) + "</div></section>\n")


def _stills(media: dict) -> str:
    """The row's input image and keyframe, each named, to show beside its video."""
    pairs = (("input image", media.get("input_image")), media.get("keyframe") or (None, None))
    return "".join(f"<figure class=\"still\"><img src=\"{esc(src)}\" alt=\"{esc(name)}\">"
                   f"<figcaption class=\"muted\">{esc(name)}</figcaption></figure>"
                   for name, src in pairs if src)

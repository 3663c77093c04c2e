"""``report.html``: one self-contained static page that says what an output holds.

The page is built from the committed manifests (never from in-flight state) and ``job.json``:
a run summary, throughput over time, each score's distribution and lowest rows, the ok rows the
quality gate kept below its rules and the rows each rule held back, a gallery of a sample of the
videos, and the failures grouped by error code. It has no external assets and makes no network
request: plots are inline SVG, the one script and the style are inline and pinned by hash in a
Content-Security-Policy that allows media from the output itself only, and every link is
relative to the output root, where the page lives, so the page works from local disk, from an
object store, and after the output is copied. Same output, same bytes: the page carries no
time of its own.
"""

from __future__ import annotations

import base64
import hashlib

from jobs.products.report import sections
from jobs.products.report.gallery import gallery
from jobs.products.report.gather import Gathered, gather
from jobs.products.report.media import add_input_images
from jobs.products.report.text import esc
from jobs.store import layout
from jobs.store.job_file import read_job, require_output
from rendering import storage


def write_report(output_uri: str, sample_size: int = 48) -> str:
    """Write ``report.html`` under the output, atomically; return its URI."""
    fs, root = storage.filesystem(output_uri)
    require_output(output_uri)
    job = read_job(output_uri)
    gathered = gather(output_uri, sample_size)
    add_input_images(gathered.sample(), job or {})
    complete = fs.exists(storage.join(root, layout.SUCCESS_FILE))
    page = render_html(gathered, job or {}, name=output_uri.rstrip("/").rsplit("/", 1)[-1],
                       complete=complete)
    path = storage.join(root, layout.REPORT_FILE)
    storage.write_bytes(fs, path, page.encode("utf-8"))
    return storage.to_uri(fs, path)


def render_html(g: Gathered, job: dict, name: str = "", complete: bool = False) -> str:
    """The whole page, from what was gathered and ``job.json`` (pure: same input, same bytes)."""
    title = f"reelfarm report: {name}" if name else "reelfarm report"
    parts = [
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n",  # no " or &
        "<meta name=\"referrer\" content=\"no-referrer\">\n",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
        "<link rel=\"icon\" href=\"data:,\">\n",
        f"<title>{esc(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n",
        f"<h1>{esc(title)}</h1>\n",
        sections.summary(g, job, complete),
        sections.throughput(g),
        sections.workers(job),
        sections.scores(g),
        sections.quality_gate(g, job),
        gallery(g),
        sections.failures(g),
        "<p class=\"muted\">Written by reelfarm from the committed manifests and "
        f"{esc(layout.JOB_FILE)}. Links are relative to this page: it works wherever the "
        "output is copied, as long as it stays at the output's root.</p>\n",
        f"<script>{_SCRIPT}</script>\n</body>\n</html>\n",
    ]
    return "".join(parts)


_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:1em 1.5em;
color:#1d2330;background:#fafbfc}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.15em;margin:1.6em 0 .5em;
border-bottom:1px solid #d8dde6;padding-bottom:.2em}
table{border-collapse:collapse}td,th{text-align:left;padding:.2em .8em .2em 0;vertical-align:top}
th{font-weight:600;color:#4a5468}code,.mono{font-family:ui-monospace,monospace;font-size:.92em}
.muted{color:#6b7588}.bad{color:#b42318}.good{color:#067647}
svg{width:100%;height:auto;max-width:900px;display:block;background:#fff;
border:1px solid #e3e7ee}
.bar{fill:#3b6fd8}.bar:hover{fill:#1d4fb0}.axis{stroke:#8a94a6}.lbl{font:11px sans-serif;
fill:#4a5468}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:12px}
.card{margin:0;background:#fff;border:1px solid #e3e7ee;padding:8px;overflow-wrap:anywhere}
.card video{width:100%;aspect-ratio:1;background:#111;image-rendering:pixelated}
.pair{display:flex;gap:4px;align-items:flex-start}.pair>*{flex:1;min-width:0}
.still{margin:0}.still img{width:100%;display:block;background:#111}
.still figcaption{font-size:.8em}
.card p{margin:.3em 0}.params{list-style:none;margin:.3em 0;padding:0;font-size:.86em}
.params li{display:inline-block;margin-right:.8em}.params .k{color:#6b7588}
.thumb{width:64px;display:block;background:#111}
.prompt{white-space:pre-wrap}.err{white-space:pre-wrap;max-width:60em}
button{font:inherit;margin-right:.4em}button[aria-pressed=true]{font-weight:700}
details{margin:.4em 0}summary{cursor:pointer}
"""


# Sorts the gallery by a card's data-* value; cards without one go last, ties in row order.
_SCRIPT = """
(function () {
  var grid = document.getElementById("grid");
  if (!grid) { return; }
  function value(card, key) {
    var text = card.getAttribute("data-" + key);
    return text === null || text === "" ? NaN : parseFloat(text);
  }
  function sortBy(key, direction) {
    var cards = Array.prototype.slice.call(grid.children);
    cards.sort(function (a, b) {
      var x = value(a, key), y = value(b, key);
      if (isNaN(x) !== isNaN(y)) { return isNaN(x) ? 1 : -1; }
      if (!isNaN(x) && x !== y) { return direction * (x - y); }
      return value(a, "row") - value(b, "row");
    });
    cards.forEach(function (card) { grid.appendChild(card); });
  }
  var buttons = document.querySelectorAll("button[data-sort]");
  Array.prototype.forEach.call(buttons, function (button) {
    button.addEventListener("click", function () {
      sortBy(button.getAttribute("data-sort"), parseFloat(button.getAttribute("data-dir")));
      Array.prototype.forEach.call(buttons, function (other) {
        other.setAttribute("aria-pressed", other === button ? "true" : "false");
      });
    });
  });
})();
"""


def _hash_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# No network: nothing but the output's own media and inline data; the style and script are
# the page's own, pinned by hash (so an injected element could not run or style anything).
CSP = ("default-src 'none'; img-src 'self' data:; media-src 'self'; "
       f"style-src {_hash_source(_STYLE)}; script-src {_hash_source(_SCRIPT)}; "
       "base-uri 'none'; form-action 'none'")

"""``report.html``: one self-contained static page that says what an output holds.

The page is built from the committed manifests (never from in-flight state) and ``job.json``:
a run summary, throughput over time, the score distribution, the ok rows the quality gate kept
below its threshold, a gallery of a sample of the videos, the lowest-scoring rows and the
failures grouped by error code. It has no external assets and makes no network request: plots
are inline SVG, the one script and the style are inline and pinned by hash in a
Content-Security-Policy that allows media from the output itself only, and every link is
relative to the output root, where the page lives, so the page works from local disk, from an
object store, and after the output is copied.

Bounded at any size: the manifests are read a shard at a time, and what is kept is fixed in
size. The gallery is a deterministic sample (the ok rows whose ``row_hash`` is smallest, so the
same output always shows the same videos), the lowest scores are kept in a heap, histograms
widen their bins as the range grows, and prompts and errors are cut to a few hundred
characters. Same output, same bytes: the page carries no time of its own.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import html
import io
import itertools
import math
import re
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError

from jobs.store import layout, manifest
from jobs import params
from jobs.config import InputConfig, JobConfig, LimitsConfig
from jobs.store.hashset import key_hashes, row_hash
from jobs.input.media import media_roots
from jobs.store.job_file import read_job, require_output
from rendering import storage
from rendering.contract import MediaInput, MediaSpec
from rendering.media import MediaError, load_image
from rendering.quality import kept_below_text

SCORE_COLUMN = "clip_score"
LOWEST_ROWS = 12  # lowest-scoring rows listed
KEPT_ROWS = 100  # rows kept below quality.min_score listed (all are counted)
ERROR_EXAMPLES = 3  # example rows shown per error code
MAX_ERROR_CODES = 50  # codes kept apart; more are counted together (codes are a small vocabulary)
PROMPT_CHARS = 300  # prompts and errors are cut here: the page stays small at any prompt size
ERROR_CHARS = 400
ID_CHARS = 120
PREVIEW_ARTIFACTS = ("poster", "webp", "gif")  # shown before the video plays, best first
THUMB_PX = 128  # longest side of a row's input image, inlined beside its video in the gallery
_THUMB_THREADS = 8  # input images are read from storage: I/O bound
# Histograms keep at most this many bins: past it, bins widen to the next width (an exact
# multiple of the last, so merged counts stay exact).
TIME_BINS = 120
SCORE_BINS = 50
_TIME_WIDTHS_S = (1, 5, 10, 30, 60, 300, 600, 1800, 3600, 7200, 21600, 43200, 86400, 604800,
                  2419200, 31449600)


class Bins:
    """A histogram of unknown range, filled a batch at a time, in bounded memory.

    Bin ``k`` holds values in ``[k * width, (k + 1) * width)``. When the occupied keys span
    more than ``max_bins``, the width steps up to the next one (a multiple of the last) and
    keys merge by integer division, so the result does not depend on how values were batched.
    """

    def __init__(self, widths, max_bins: int):
        self._widths = iter(widths)
        self.width = next(self._widths)
        self.max_bins = max_bins
        self.counts: Counter = Counter()

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if len(values) == 0:
            return
        keys, counts = np.unique(np.floor(values / self.width).astype(np.int64),
                                 return_counts=True)
        self.counts.update(dict(zip(keys.tolist(), counts.tolist())))
        while max(self.counts) - min(self.counts) + 1 > self.max_bins:
            wider = next(self._widths)
            factor = round(wider / self.width)
            merged: Counter = Counter()
            for key, count in self.counts.items():
                merged[key // factor] += count
            self.counts, self.width = merged, wider

    def dense(self) -> list[tuple[float, int]]:
        """(left edge, count) of every bin from the first occupied to the last."""
        if not self.counts:
            return []
        return [(k * self.width, self.counts.get(k, 0))
                for k in range(min(self.counts), max(self.counts) + 1)]


def _score_widths():
    """1e-4, 2e-4, 1e-3, 2e-3, ...: each width a multiple of the last (x2, then x5)."""
    for exponent in itertools.count(-4):
        yield 10.0 ** exponent
        yield 2 * 10.0 ** exponent


def _time_widths():
    yield from _TIME_WIDTHS_S
    width = _TIME_WIDTHS_S[-1]
    while True:
        width *= 2
        yield width


@dataclass
class Gathered:
    """What the page shows, gathered from the manifests one shard at a time."""

    sample_size: int = 48
    rows: int = 0
    ok: int = 0
    by_status: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # error code -> failed rows
    examples: dict = field(default_factory=dict)  # error code -> its first few rows
    first_commit: float | None = None
    last_commit: float | None = None
    throughput: Bins = field(default_factory=lambda: Bins(_time_widths(), TIME_BINS))
    scores: Bins = field(default_factory=lambda: Bins(_score_widths(), SCORE_BINS))
    scored: int = 0
    score_sum: float = 0.0
    score_min: float = math.inf
    score_max: float = -math.inf
    gate: manifest.Tally = field(default_factory=manifest.Tally)  # its kept_below counts only
    kept: list = field(default_factory=list)  # the first KEPT_ROWS rows kept below the gate
    _sample: list = field(default_factory=list)  # max-heap of (-hash, seq, row)
    _lowest: list = field(default_factory=list)  # max-heap of (-score, -hash, seq, row)
    _seq: itertools.count = field(default_factory=itertools.count)

    def add(self, table: pa.Table) -> None:
        """Take in one shard's committed rows."""
        self.rows += table.num_rows
        status = table["status"]
        self.by_status.update({s: n for s, n in zip(*_value_counts(status)) if s is not None})
        times = pc.min_max(table["committed_at"]).as_py()
        if times["min"] is not None:
            self.first_commit = min(times["min"], self.first_commit or times["min"])
            self.last_commit = max(times["max"], self.last_commit or times["max"])
        self._add_failures(table.filter(pc.fill_null(pc.equal(status, "failed"), False)))
        ok = table.filter(pc.fill_null(pc.equal(status, "ok"), False))
        self.ok += ok.num_rows
        if ok.num_rows == 0:
            return
        self.throughput.add(ok["committed_at"].to_numpy(zero_copy_only=False))
        self._add_kept(self.gate.add_gate(ok))
        scores = _scores(ok)
        hashes = _row_hashes(ok)
        self._add_sample(ok, hashes, scores)
        if scores is not None:
            self._add_scores(ok, hashes, scores)

    def _add_failures(self, failed: pa.Table) -> None:
        wanted: list[tuple[str, int]] = []  # (code, index) of this shard's examples
        for index, code in enumerate(failed["error_code"].to_pylist()):
            code = code or "unknown"
            if code not in self.errors and len(self.errors) >= MAX_ERROR_CODES:
                code = "(other codes)"
            self.errors[code] += 1
            taken = len(self.examples.get(code, ())) + sum(c == code for c, _ in wanted)
            if taken < ERROR_EXAMPLES:
                wanted.append((code, index))
        for (code, _), row in zip(wanted, _rows(failed, [i for _, i in wanted])):
            self.examples.setdefault(code, []).append(row)

    def _add_kept(self, kept: pa.Table | None) -> None:
        if kept is None or len(self.kept) >= KEPT_ROWS:
            return
        head = kept.slice(0, KEPT_ROWS - len(self.kept))
        self.kept += _rows(head, list(range(head.num_rows)), _scores(head))

    def _add_sample(self, ok: pa.Table, hashes: np.ndarray, scores: np.ndarray | None) -> None:
        if self.sample_size <= 0:
            return
        candidates = np.arange(len(hashes))
        if len(self._sample) >= self.sample_size:  # only rows that beat the current largest
            candidates = candidates[hashes < np.uint64(-self._sample[0][0])]
        candidates = candidates[np.argsort(hashes[candidates], kind="stable")][:self.sample_size]
        for i, row in zip(candidates.tolist(), _rows(ok, candidates.tolist(), scores)):
            entry = (-int(hashes[i]), next(self._seq), row)
            if len(self._sample) < self.sample_size:
                heapq.heappush(self._sample, entry)
            elif entry[0] > self._sample[0][0]:
                heapq.heapreplace(self._sample, entry)

    def _add_scores(self, ok: pa.Table, hashes: np.ndarray, scores: np.ndarray) -> None:
        finite = np.flatnonzero(np.isfinite(scores))
        if len(finite) == 0:
            return
        values = scores[finite]
        self.scores.add(values)
        self.scored += len(values)
        self.score_sum += float(values.sum())
        self.score_min = min(self.score_min, float(values.min()))
        self.score_max = max(self.score_max, float(values.max()))
        # The shard's lowest few by (score, hash) are the only ones that can enter the heap.
        order = np.lexsort((hashes[finite], values))[:LOWEST_ROWS]
        chosen = finite[order]
        for i, row in zip(chosen.tolist(), _rows(ok, chosen.tolist(), scores)):
            entry = (-float(scores[i]), -int(hashes[i]), next(self._seq), row)
            if len(self._lowest) < LOWEST_ROWS:
                heapq.heappush(self._lowest, entry)
            elif entry[:2] > self._lowest[0][:2]:
                heapq.heapreplace(self._lowest, entry)

    def sample(self) -> list[dict]:
        """The gallery's rows, in input order."""
        return sorted((row for _, _, row in self._sample),
                      key=lambda r: (r["row_index"], r["occurrence"]))

    def lowest(self) -> list[dict]:
        """The lowest-scoring rows, lowest first."""
        return [row for *_, row in sorted(self._lowest, key=lambda e: (-e[0], -e[1]))]


def _row_hashes(table: pa.Table) -> np.ndarray:
    """``row_hash`` of every row: first occurrences (nearly all) at once, repeats one by one."""
    ids, occurrences = table["id"].to_pylist(), table["occurrence"].to_pylist()
    hashes = key_hashes([(i or "").encode("utf-8", "surrogatepass") for i in ids])
    for index, occurrence in enumerate(occurrences):
        if occurrence:
            hashes[index] = row_hash(ids[index] or "", occurrence)
    return hashes


def _value_counts(array) -> tuple[list, list]:
    counts = pc.value_counts(array)
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()


def _scores(table: pa.Table) -> np.ndarray | None:
    """The rows' scores as floats (NaN where missing), or None without a score column."""
    if SCORE_COLUMN not in table.column_names:
        return None
    try:
        column = pc.cast(table[SCORE_COLUMN], pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return pc.fill_null(column, math.nan).to_numpy(zero_copy_only=False)


_ROW_COLUMNS = ("id", "row_index", "occurrence", "prompt", "error_code", "error", "video_uri",
                "artifacts", "input_image_uri", "input_image_sha256", "quality_tries",
                "quality_kept_try", *params.NAMES)


def _rows(table: pa.Table, indices: list[int], scores: np.ndarray | None = None) -> list[dict]:
    """The few rows the page shows, with long text cut so that what is kept stays small."""
    if not indices:
        return []
    names = set(table.column_names)
    present = [c for c in _ROW_COLUMNS if c in names]
    rows = table.select(present).take(pa.array(indices, pa.int64())).to_pylist()
    for row, index in zip(rows, indices):
        row["prompt"] = _cut(row.get("prompt"), PROMPT_CHARS)
        row["negative_prompt"] = _cut(row.get("negative_prompt"), PROMPT_CHARS)
        row["error"] = _cut(row.get("error"), ERROR_CHARS)
        row["id"] = _cut(row.get("id"), ID_CHARS)
        score = None if scores is None else float(scores[index])
        row["score"] = score if score is not None and math.isfinite(score) else None
        row["media"] = _media(row)
        row.pop("artifacts", None)
    return rows


def _media(row: dict) -> dict:
    """The row's video, preview and an earlier stage's keyframe (the last one: it fed the
    video) as links relative to the output root (unsafe ones dropped). ``input_image``, the
    row's own conditioning image, is filled in by ``_add_input_images`` for the gallery."""
    artifacts = {a["name"]: a["path"] for a in row.get("artifacts") or [] if a}
    video = _relative_href(artifacts.get("video") or row.get("video_uri"))
    preview = next((href for href in (_relative_href(artifacts.get(name))
                                      for name in PREVIEW_ARTIFACTS) if href), None)
    keyframes = [(name, _relative_href(path)) for name, path in artifacts.items()
                 if name != "video" and name not in PREVIEW_ARTIFACTS]  # earlier stages' own
    keyframe = next(((name, href) for name, href in reversed(keyframes) if href), None)
    return {"video": video, "preview": preview, "keyframe": keyframe, "input_image": None}


def _add_input_images(rows: list[dict], job: dict) -> None:
    """Give each gallery row its input image as a small inline JPEG. The image lies outside
    the output: a link would break the page's promises (no network, works when copied). It is
    read as the job's workers read it (under its media roots, within its limits, its sha256
    checked); one that cannot be read is left out."""
    wanted = [r for r in rows if r.get("input_image_uri") and r.get("input_image_sha256")]
    spec = _media_spec(job) if wanted else None
    if spec is None:
        return
    with ThreadPoolExecutor(_THUMB_THREADS) as pool:
        for row, image in zip(wanted, pool.map(lambda r: _thumbnail(r, spec), wanted)):
            row["media"]["input_image"] = image


def _media_spec(job: dict) -> MediaSpec | None:
    """How the job's workers read media, from ``job.json``; None without a usable config."""
    config = job.get("config") or {}
    try:
        section = InputConfig.model_validate(config.get("input"))
        limits = LimitsConfig.model_validate(config.get("limits") or {})
    except ValidationError:
        return None
    # Under "error" every rendered row's image had the row's shape: scaling it down to a
    # thumbnail of that shape crops nothing.
    resize = (config.get("render") or {}).get("media_resize", "crop")
    return MediaSpec(roots=media_roots(JobConfig.model_construct(input=section)),
                     resize="crop" if resize == "error" else resize,
                     max_bytes=limits.max_media_bytes, max_pixels=limits.max_media_pixels)


def _thumbnail(row: dict, spec: MediaSpec) -> str | None:
    """The row's input image as the model saw it (fitted to the row's shape), scaled down to
    ``THUMB_PX``, as a data URI; None when it cannot be read or no longer matches its sha256."""
    width, height = row.get("width") or THUMB_PX, row.get("height") or THUMB_PX
    scale = THUMB_PX / max(width, height)
    media = MediaInput(uri=row["input_image_uri"], sha256=row["input_image_sha256"])
    try:
        image, _ = load_image(media, spec, max(1, round(width * scale)),
                              max(1, round(height * scale)))
    except MediaError:
        return None
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


_UNSAFE_PATH = re.compile(r"[\x00-\x1f\x7f\\:]")


def _relative_href(path) -> str | None:
    """A link to ``path`` (relative to the output root, where the page is), or None when it is
    not a plain relative path: no scheme, no leading slash, no ``..``."""
    if not isinstance(path, str) or not path or path.startswith("/") or _UNSAFE_PATH.search(path):
        return None
    if any(part in ("", ".", "..") for part in path.split("/")):
        return None
    return urllib.parse.quote(path, safe="/")


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def _cut(text, limit: int):
    if not isinstance(text, str):
        return text
    if len(text) > limit:
        text = text[:limit - 1] + "\u2026"
    return _CONTROL.sub("\ufffd", text)  # lone surrogates and control characters


_READ = ("status", "committed_at", SCORE_COLUMN, "quality_passed", *_ROW_COLUMNS)


def gather(output_uri: str, sample_size: int = 48) -> Gathered:
    """Read the committed manifests once, a shard at a time, into what the page shows."""
    gathered = Gathered(sample_size=sample_size)
    for table in manifest.iter_shards(output_uri, columns=_columns(output_uri)):
        gathered.add(table)
    return gathered


def _columns(output_uri: str) -> list[str] | None:
    """The columns the page reads (hashes and input identities are most of a manifest's
    bytes), or None (all) when shards differ in them, as when a later run added scores."""
    fs, _ = storage.filesystem(output_uri)
    present = None
    for path in manifest.shard_paths(output_uri):
        with fs.open(path, "rb") as f:
            names = {n for n in pq.read_schema(f).names if n in _READ}
        if present is not None and names != present:
            return None
        present = names
    return [c for c in _READ if c in (present or ())] or None


def write_report(output_uri: str, sample_size: int = 48) -> str:
    """Write ``report.html`` under the output, atomically; return its URI."""
    fs, root = storage.filesystem(output_uri)
    require_output(output_uri)
    job = read_job(output_uri)
    gathered = gather(output_uri, sample_size)
    _add_input_images(gathered.sample(), job or {})
    complete = fs.exists(storage.join(root, layout.SUCCESS_FILE))
    page = render_html(gathered, job or {}, name=output_uri.rstrip("/").rsplit("/", 1)[-1],
                       complete=complete)
    path = storage.join(root, layout.REPORT_FILE)
    storage.write_bytes(fs, path, page.encode("utf-8"))
    return storage.to_uri(fs, path)


# ---------------------------------------------------------------------------------------------
# The page. Everything from the data goes through _e (html.escape) or a number format.

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


DASH = "\u2014"


def _e(value) -> str:
    """Text from the data, safe in element content and in quoted attributes."""
    if value is None:
        return ""
    return html.escape(_cut(str(value), 10 * ERROR_CHARS), quote=True)


def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "\u2014"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _when(epoch) -> str:
    if not isinstance(epoch, (int, float)) or not math.isfinite(epoch):
        return "\u2014"
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "\u2014"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _width_label(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} s"


def render_html(g: Gathered, job: dict, name: str = "", complete: bool = False) -> str:
    """The whole page, from what was gathered and ``job.json`` (pure: same input, same bytes)."""
    title = f"reelfarm report: {name}" if name else "reelfarm report"
    parts = [
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n",  # no " or &
        "<meta name=\"referrer\" content=\"no-referrer\">\n",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
        "<link rel=\"icon\" href=\"data:,\">\n",
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n",
        f"<h1>{_e(title)}</h1>\n",
        _summary(g, job, complete),
        _throughput(g),
        _score_section(g),
        _gate(g, job),
        _gallery(g),
        _lowest(g),
        _failures(g),
        "<p class=\"muted\">Written by reelfarm from the committed manifests and "
        f"{_e(layout.JOB_FILE)}. Links are relative to this page: it works wherever the "
        "output is copied, as long as it stays at the output's root.</p>\n",
        f"<script>{_SCRIPT}</script>\n</body>\n</html>\n",
    ]
    return "".join(parts)


def _table(rows: list[tuple[str, str]]) -> str:
    """A two-column table; the values are already HTML."""
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>\n"


def _model_row(config: dict, run: dict) -> tuple[str, str]:
    """The model, or each stage's model with what the last run's workers made of it."""
    if not config.get("stages"):
        return "Model", f"<code>{_e((config.get('model') or {}).get('path') or DASH)}</code>"
    figures = run.get("stages") or {}
    parts = []
    for stage in config["stages"]:
        made = figures.get(stage["name"]) or {}
        rate = (f" ({_num(made.get('made'))} made, {_num(made.get('rows_per_s'))} rows/s, "
                f"{_num(made.get('workers'))} worker(s))" if made else "")
        parts.append(f"{_e(stage['name'])}: <code>{_e(stage['model']['path'])}</code>{rate}")
    return "Stages", " \u2192 ".join(parts)


def _summary(g: Gathered, job: dict, complete: bool) -> str:
    run = job.get("last_run") or {}
    config = job.get("config") or {}
    counts = job.get("counts") or {}
    expected = counts.get("rows")
    failed = g.by_status.get("failed", 0)
    share = f" ({100 * failed / g.rows:.1f}%)" if g.rows and failed else ""
    others = ", ".join(f"{_e(s)}: {n:,}" for s, n in sorted(g.by_status.items())
                       if s not in ("ok", "failed"))
    render = config.get("render") or {}
    shape = (f"{_num(render.get('num_frames'))} frames, {_num(render.get('width'))}\u00d7"
             f"{_num(render.get('height'))}, {_num(render.get('num_inference_steps'))} steps"
             if render else "\u2014")
    rows = [
        ("Status", ("<span class=\"good\">complete</span>" if complete
                    else "<span class=\"bad\">incomplete</span>")
         + (f", last run {_e(run.get('status'))}" if run.get("status") else "")),
        ("Rows", f"{g.rows:,} committed" + (f" of {expected:,}" if isinstance(expected, int)
                                            else "")),
        ("OK", f"<span class=\"good\">{g.ok:,}</span>" + _kept_note(g, job)),
        ("Failed", f"<span class=\"{'bad' if failed else 'good'}\">{failed:,}</span>{share}"),
    ]
    if others:
        rows.append(("Other", others))
    rows += [
        ("Videos/hour", f"{_num(run.get('videos_per_hour'))} (last run, rendering time only)"),
        ("Time", f"{_duration(run.get('seconds'))} in all: start-up "
                 f"{_duration(run.get('startup_s'))}, rendering {_duration(run.get('rendering_s'))}"
                 f"; {_num(run.get('rendered'))} rendered"),
        ("Last run", f"{_when(run.get('started_at'))} \u2192 {_when(run.get('finished_at'))}"),
        ("Commits", f"{_when(g.first_commit)} \u2192 {_when(g.last_commit)}"),
        _model_row(config, run),
        ("Shape", _e(shape)),
        ("Fingerprint", f"<code>{_e(job.get('fingerprint') or DASH)}</code>"),
    ]
    versions = job.get("versions") or {}
    if versions:
        rows.append(("Versions", ", ".join(f"{_e(k)} {_e(v)}" for k, v in sorted(versions.items())
                                           if v)))
    settings = job.get("settings") or {}
    details = ""
    if settings:
        body = "".join(f"<tr><th><code>{_e(k)}</code></th><td><code>{_e(v)}</code></td></tr>"
                       for k, v in sorted(settings.items()))
        details = (f"<details><summary>Settings the fingerprint covers ({len(settings)})"
                   f"</summary><table>{body}</table></details>\n")
    return f"<section id=\"summary\"><h2>Run</h2>\n{_table(rows)}{details}</section>\n"


def _bars_svg(bins: list[tuple[float, float]], width: float, labels: tuple[str, str],
              tips: list[str], y_label: str) -> str:
    """A bar chart: one bar per (left edge, value), the x-axis labelled at both ends."""
    w, h, left, bottom, top = 900, 260, 56, 26, 12
    peak = max((v for _, v in bins), default=0) or 1
    step = (w - left - 8) / max(len(bins), 1)
    bars = []
    for i, ((_, value), tip) in enumerate(zip(bins, tips)):
        bar_h = (h - top - bottom) * value / peak
        x, y = left + i * step, h - bottom - bar_h
        bars.append(f"<rect class=\"bar\" x=\"{x:.1f}\" y=\"{y:.1f}\" "
                    f"width=\"{max(step - 1, 0.5):.1f}\" height=\"{bar_h:.1f}\">"
                    f"<title>{_e(tip)}</title></rect>")
    axis_y = h - bottom
    return (f"<svg viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"{_e(y_label)}\">"
            f"<line class=\"axis\" x1=\"{left}\" y1=\"{axis_y}\" x2=\"{w - 8}\" y2=\"{axis_y}\"/>"
            f"<line class=\"axis\" x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{axis_y}\"/>"
            f"<text class=\"lbl\" x=\"{left - 4}\" y=\"{top + 10}\" text-anchor=\"end\">"
            f"{_e(_num(float(peak), 3))}</text>"
            f"<text class=\"lbl\" x=\"{left - 4}\" y=\"{axis_y}\" text-anchor=\"end\">0</text>"
            f"<text class=\"lbl\" x=\"{left}\" y=\"{h - 8}\">{_e(labels[0])}</text>"
            f"<text class=\"lbl\" x=\"{w - 8}\" y=\"{h - 8}\" text-anchor=\"end\">"
            f"{_e(labels[1])}</text>{''.join(bars)}</svg>\n")


def _throughput(g: Gathered) -> str:
    head = "<section id=\"throughput\"><h2>Throughput</h2>\n"
    bins = g.throughput.dense()
    if not bins:
        return head + "<p class=\"muted\">No videos committed yet.</p></section>\n"
    width = g.throughput.width
    rates = [(t, 3600 * n / width) for t, n in bins]
    tips = [f"{_when(t)}: {n:,} videos ({3600 * n / width:,.0f}/hour)" for t, n in bins]
    ends = (_when(bins[0][0]), _when(bins[-1][0] + width))
    return (head + f"<p>Videos committed per hour, in bins of {_e(_width_label(width))} "
            f"(by each shard's commit time).</p>\n"
            + _bars_svg(rates, width, ends, tips, "videos per hour over time") + "</section>\n")


def _score_section(g: Gathered) -> str:
    head = f"<section id=\"scores\"><h2>Scores (<code>{_e(SCORE_COLUMN)}</code>)</h2>\n"
    if not g.scored:
        return head + "<p class=\"muted\">no scores</p></section>\n"
    bins = g.scores.dense()
    width = g.scores.width
    tips = [f"[{_num(x)}, {_num(x + width)}): {n:,} rows" for x, n in bins]
    stats = (f"{g.scored:,} scored rows: mean {_num(g.score_sum / g.scored)}, min "
             f"{_num(g.score_min)}, max {_num(g.score_max)}; bins of {_num(width)}.")
    ends = (_num(bins[0][0]), _num(bins[-1][0] + width))
    return (head + f"<p>{stats}</p>\n"
            + _bars_svg([(x, float(n)) for x, n in bins], width, ends, tips, "score histogram")
            + "</section>\n")


def _params_list(row: dict) -> str:
    items = [("id", f"<code>{_e(row.get('id'))}</code>")]
    if row.get("score") is not None:
        items.append(("score", f"<b>{_e(_num(row['score']))}</b>"))
    for name in params.NAMES:
        value = row.get(name)
        if value is not None:
            items.append((name, _e(value if name in ("seed", "negative_prompt")
                                   else _num(value))))
    return ("<ul class=\"params\">"
            + "".join(f"<li><span class=\"k\">{_e(k)}</span> {v}</li>" for k, v in items)
            + "</ul>")


def _gallery(g: Gathered) -> str:
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
            poster = f" poster=\"{_e(media['preview'])}\"" if media["preview"] else ""
            preload = "none" if media["preview"] else "metadata"
            player = (f"<video controls loop muted playsinline preload=\"{preload}\"{poster} "
                      f"src=\"{_e(media['video'])}\"></video>")
            link = f"<p><a href=\"{_e(media['video'])}\">open video</a></p>"
        else:
            player, link = "<p class=\"muted\">(no playable link)</p>", ""
        stills = _stills(media)
        video = (f"<div class=\"pair\">{stills}{player}</div>" if stills else player) + link
        cards.append(f"<figure class=\"card\" data-row=\"{int(row['row_index'])}\" "
                     f"data-score=\"{_e(score)}\">{video}<figcaption>"
                     f"<p class=\"prompt\"><bdi>{_e(row.get('prompt'))}</bdi></p>"
                     f"{_params_list(row)}</figcaption></figure>\n")
    return (head + f"<p>{shown}. Click a video to play it.</p>\n{buttons}<div id=\"grid\">\n"
            + "".join(cards) + "</div></section>\n")


def _stills(media: dict) -> str:
    """The row's input image and keyframe, each named, to show beside its video."""
    pairs = (("input image", media.get("input_image")), media.get("keyframe") or (None, None))
    return "".join(f"<figure class=\"still\"><img src=\"{_e(src)}\" alt=\"{_e(name)}\">"
                   f"<figcaption class=\"muted\">{_e(name)}</figcaption></figure>"
                   for name, src in pairs if src)


def _code(value) -> str:
    return f"<code>{_e(value)}</code>"


def _link(row: dict, text: str) -> str:
    href = row["media"]["video"]
    return f"<a href=\"{_e(href)}\">{text}</a>" if href else text


def _lowest(g: Gathered) -> str:
    head = "<section id=\"lowest\"><h2>Lowest scores</h2>\n"
    rows = g.lowest()
    if not rows:
        return head + "<p class=\"muted\">no scores</p></section>\n"
    body = "".join(
        f"<tr><td>{_e(_num(r['score']))}</td><td>{_link(r, _code(r.get('id')))}</td>"
        f"<td class=\"prompt\"><bdi>{_e(r.get('prompt'))}</bdi></td>"
        f"<td class=\"mono\">{_e(r.get('seed'))}</td></tr>\n" for r in rows)
    return (head + f"<p>The {len(rows)} ok rows with the lowest "
            f"<code>{_e(SCORE_COLUMN)}</code>.</p>\n<table><tr><th>score</th><th>id</th>"
            f"<th>prompt</th><th>seed</th></tr>\n{body}</table></section>\n")


def _min_score(job: dict):
    return ((job.get("config") or {}).get("quality") or {}).get("min_score")


def _kept_note(g: Gathered, job: dict) -> str:
    text = kept_below_text(g.gate.kept_below, _min_score(job))
    return f" (<span class=\"bad\">{_e(text)}</span>)" if text else ""


def _tries(row: dict) -> str:
    """Each try's score, the kept one in bold."""
    tries, kept = row.get("quality_tries") or [], row.get("quality_kept_try")
    scores = [f"<b>{_e(_num(t['clip_score']))}</b>" if i == kept else _e(_num(t["clip_score"]))
              for i, t in enumerate(tries)]
    return f"{len(tries)}: " + ", ".join(scores)


def _gate(g: Gathered, job: dict) -> str:
    """The ok rows kept below quality.min_score: ok by status and exit code, so only this
    section (and the counts) shows them. Nothing for an output rendered without a gate."""
    min_score = _min_score(job)
    if min_score is None and not g.gate.kept_below:
        return ""
    head = "<section id=\"gate\"><h2>Quality gate</h2>\n"
    count = sum(g.gate.kept_below.values())
    if not count:
        return (head + f"<p class=\"good\">Every scored ok row reached "
                f"<code>quality.min_score</code> {_e(_num(min_score))}.</p></section>\n")
    body = "".join(
        f"<tr><td>{_link(r, _code(r.get('id')))}</td><td>{_e(_num(r['score']))}</td>"
        f"<td class=\"mono\">{_tries(r)}</td>"
        f"<td class=\"prompt\"><bdi>{_e(r.get('prompt'))}</bdi></td></tr>\n" for r in g.kept)
    shown = "" if len(g.kept) == count else f" The first {len(g.kept):,} are listed."
    return (head + f"<p>{_e(kept_below_text(g.gate.kept_below, min_score))}: ok rows whose "
            f"best try is below the gate (<code>quality_passed</code> false).{shown}</p>\n"
            f"<table><tr><th>id</th><th>score</th><th>tries (kept in bold)</th><th>prompt</th>"
            f"</tr>\n{body}</table></section>\n")


def _failures(g: Gathered) -> str:
    head = "<section id=\"failures\"><h2>Failures</h2>\n"
    if not g.errors:
        return head + "<p class=\"good\">No failed rows.</p></section>\n"
    groups = []
    for code, count in sorted(g.errors.items(), key=lambda item: (-item[1], item[0])):
        examples = "".join(
            f"<tr><td><code>{_e(r.get('id'))}</code></td><td class=\"err\">{_e(r.get('error'))}"
            f"</td><td class=\"prompt\"><bdi>{_e(r.get('prompt'))}</bdi></td></tr>\n"
            for r in g.examples.get(code, []))
        groups.append(f"<details class=\"failure\" open><summary><code>{_e(code)}</code>: "
                      f"{count:,} row{'s' if count != 1 else ''}</summary>\n<table><tr><th>id"
                      f"</th><th>error</th><th>prompt</th></tr>\n{examples}</table></details>\n")
    total = sum(g.errors.values())
    return (head + f"<p>{total:,} failed row{'s' if total != 1 else ''} in {len(g.errors)} "
            f"error code"
            f"{'s' if len(g.errors) != 1 else ''}, most common first, with up to "
            f"{ERROR_EXAMPLES} examples each (<code>reelfarm status OUTPUT --failed</code> "
            f"lists them all).</p>\n" + "".join(groups) + "</section>\n")

"""The report's sections as HTML, each a pure function of what was gathered and ``job.json``.

The run, throughput and each score's distribution (inline SVG bar charts) with its lowest rows,
the quality gate and its rules, and the failures; pure, so the same output gives the same page,
byte for byte.
"""

from __future__ import annotations

from jobs.products.report.gather import ERROR_EXAMPLES, Gathered
from jobs.products.report.scores import Distribution
from jobs.products.report.text import DASH, duration, esc, num, when, width_label
from rendering.quality import Rule, gate_words, kept_below_text


def _table(rows: list[tuple[str, str]]) -> str:
    """A two-column table; the values are already HTML."""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>\n"


def _model_row(config: dict, run: dict) -> tuple[str, str]:
    """The model, or each stage's model with what the last run's workers made of it."""
    if not config.get("stages"):
        return "Model", f"<code>{esc((config.get('model') or {}).get('path') or DASH)}</code>"
    figures = run.get("stages") or {}
    parts = []
    for stage in config["stages"]:
        made = figures.get(stage["name"]) or {}
        rate = (f" ({num(made.get('made'))} made, {num(made.get('rows_per_s'))} rows/s, "
                f"{num(made.get('workers'))} worker(s))" if made else "")
        parts.append(f"{esc(stage['name'])}: <code>{esc(stage['model']['path'])}</code>{rate}")
    return "Stages", " \u2192 ".join(parts)


def summary(g: Gathered, job: dict, complete: bool) -> str:
    run = job.get("last_run") or {}
    config = job.get("config") or {}
    counts = job.get("counts") or {}
    expected = counts.get("rows")
    failed = g.by_status.get("failed", 0)
    share = f" ({100 * failed / g.rows:.1f}%)" if g.rows and failed else ""
    others = ", ".join(f"{esc(s)}: {n:,}" for s, n in sorted(g.by_status.items())
                       if s not in ("ok", "failed"))
    render = config.get("render") or {}
    shape = (f"{num(render.get('num_frames'))} frames, {num(render.get('width'))}\u00d7"
             f"{num(render.get('height'))}, {num(render.get('num_inference_steps'))} steps"
             if render else "\u2014")
    rows = [
        ("Status", ("<span class=\"good\">complete</span>" if complete
                    else "<span class=\"bad\">incomplete</span>")
         + (f", last run {esc(run.get('status'))}" if run.get("status") else "")),
        ("Rows", f"{g.rows:,} committed" + (f" of {expected:,}" if isinstance(expected, int)
                                            else "")),
        ("OK", f"<span class=\"good\">{g.ok:,}</span>" + _kept_note(g, job)),
        ("Failed", f"<span class=\"{'bad' if failed else 'good'}\">{failed:,}</span>{share}"),
    ]
    if others:
        rows.append(("Other", others))
    if g.duplicates:
        rows.append(("Near-duplicates", f"{g.duplicates:,} ok rows marked <code>duplicate_of</code>"
                     " an earlier row (<code>reelfarm dedup</code>)"))
    rows += [
        ("Videos/hour", f"{num(run.get('videos_per_hour'))} (last run, rendering time only)"),
        ("Time", f"{duration(run.get('seconds'))} in all: start-up "
                 f"{duration(run.get('startup_s'))}, rendering {duration(run.get('rendering_s'))}"
                 f"; {num(run.get('rendered'))} rendered"),
        ("Last run", f"{when(run.get('started_at'))} \u2192 {when(run.get('finished_at'))}"),
        ("Commits", f"{when(g.first_commit)} \u2192 {when(g.last_commit)}"),
        _model_row(config, run),
        ("Shape", esc(shape)),
        ("Fingerprint", f"<code>{esc(job.get('fingerprint') or DASH)}</code>"),
    ]
    versions = job.get("versions") or {}
    if versions:
        rows.append(("Versions", ", ".join(f"{esc(k)} {esc(v)}" for k, v in sorted(versions.items())
                                           if v)))
    settings = job.get("settings") or {}
    details = ""
    if settings:
        body = "".join(f"<tr><th><code>{esc(k)}</code></th><td><code>{esc(v)}</code></td></tr>"
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
                    f"<title>{esc(tip)}</title></rect>")
    axis_y = h - bottom
    return (f"<svg viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"{esc(y_label)}\">"
            f"<line class=\"axis\" x1=\"{left}\" y1=\"{axis_y}\" x2=\"{w - 8}\" y2=\"{axis_y}\"/>"
            f"<line class=\"axis\" x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{axis_y}\"/>"
            f"<text class=\"lbl\" x=\"{left - 4}\" y=\"{top + 10}\" text-anchor=\"end\">"
            f"{esc(num(float(peak), 3))}</text>"
            f"<text class=\"lbl\" x=\"{left - 4}\" y=\"{axis_y}\" text-anchor=\"end\">0</text>"
            f"<text class=\"lbl\" x=\"{left}\" y=\"{h - 8}\">{esc(labels[0])}</text>"
            f"<text class=\"lbl\" x=\"{w - 8}\" y=\"{h - 8}\" text-anchor=\"end\">"
            f"{esc(labels[1])}</text>{''.join(bars)}</svg>\n")


def throughput(g: Gathered) -> str:
    head = "<section id=\"throughput\"><h2>Throughput</h2>\n"
    bins = g.throughput.dense()
    if not bins:
        return head + "<p class=\"muted\">No videos committed yet.</p></section>\n"
    width = g.throughput.width
    rates = [(t, 3600 * n / width) for t, n in bins]
    tips = [f"{when(t)}: {n:,} videos ({3600 * n / width:,.0f}/hour)" for t, n in bins]
    ends = (when(bins[0][0]), when(bins[-1][0] + width))
    return (head + f"<p>Videos committed per hour, in bins of {esc(width_label(width))} "
            f"(by each shard's commit time).</p>\n"
            + _bars_svg(rates, width, ends, tips, "videos per hour over time") + "</section>\n")


WORKER_BINS = 60


def workers(job: dict) -> str:
    """A chart per stage of its workers over the last run (job.json's ``workers_over_time``):
    how the pools followed the cluster. Nothing for a run that did not record it."""
    points = (job.get("last_run") or {}).get("workers_over_time") or []
    try:
        start, end = float(points[0]["at"]), float(points[-1]["at"])
        stages = sorted({str(name) for point in points for name in point["workers"]})
        width = max(end - start, 1e-3) / WORKER_BINS
        charts = []
        for stage in stages:
            bins, i = [], 0
            for b in range(WORKER_BINS):  # the count in force at each bin's start
                t = start + b * width
                while i + 1 < len(points) and float(points[i + 1]["at"]) <= t:
                    i += 1
                bins.append((t, float(points[i]["workers"].get(stage, 0))))
            tips = [f"{when(t)}: {n:g} worker(s)" for t, n in bins]
            charts.append(f"<h3>{esc(stage)}</h3>\n" + _bars_svg(
                bins, width, (when(start), when(end)), tips, f"{stage} workers over time"))
    except (IndexError, KeyError, TypeError, ValueError, AttributeError):
        return ""  # no record (an older output), or not one this version wrote
    return ("<section id=\"workers\"><h2>Workers</h2>\n<p>Workers taking shards in the last "
            "run, per stage: nodes joining, lost or drained, workers retired at the tail.</p>\n"
            + "".join(charts) + "</section>\n")


# What each score is, as the page names it.
SCORE_MEANINGS = {
    "clip_score": "How well the frames match the prompt (CLIP, 0-100, mean over the frames)",
    "aesthetic_score": "The aesthetic head's mean over the first, middle and last frames",
    "motion_score": "Mean optical flow, in pixels per frame at 128 px",
}


def scores(g: Gathered) -> str:
    """Each score with values: its distribution and its lowest ok rows."""
    head = "<section id=\"scores\"><h2>Scores</h2>\n"
    shown = g.shown_scores()
    if not shown:
        return head + "<p class=\"muted\">no scores</p></section>\n"
    return head + "".join(_score(d, g) for d in shown) + "</section>\n"


def _score(d: Distribution, g: Gathered) -> str:
    bins, width = d.bins.dense(), d.bins.width
    tips = [f"[{num(x)}, {num(x + width)}): {n:,} rows" for x, n in bins]
    static = (f" {g.static:,} flagged static (<code>motion_static</code>)."
              if d.column == "motion_score" else "")
    stats = (f"{d.count:,} scored ok rows: mean {esc(num(d.mean))}, min {esc(num(d.low))}, "
             f"max {esc(num(d.high))}; bins of {esc(num(width))}.{static}")
    ends = (num(bins[0][0]), num(bins[-1][0] + width))
    lowest = d.lowest.rows()
    body = "".join(
        f"<tr><td>{_thumb(r)}</td><td>{esc(num(r['score']))}</td>"
        f"<td>{_link(r, _code(r.get('id')))}</td>"
        f"<td class=\"prompt\"><bdi>{esc(r.get('prompt'))}</bdi></td>"
        f"<td class=\"mono\">{esc(r.get('seed'))}</td></tr>\n" for r in lowest)
    return (f"<h3 id=\"score-{esc(d.column)}\"><code>{esc(d.column)}</code></h3>\n"
            f"<p>{esc(SCORE_MEANINGS[d.column])}. {stats}</p>\n"
            + _bars_svg([(x, float(n)) for x, n in bins], width, ends, tips,
                        f"{d.column} histogram")
            + f"<p>The {len(lowest)} lowest:</p>\n<table class=\"lowest\"><tr><th></th>"
            f"<th>score</th><th>id</th><th>prompt</th><th>seed</th></tr>\n{body}</table>\n")


def _code(value) -> str:
    return f"<code>{esc(value)}</code>"


def _link(row: dict, text: str) -> str:
    href = row["media"]["video"]
    return f"<a href=\"{esc(href)}\">{text}</a>" if href else text


def _thumb(row: dict) -> str:
    """The row's preview (a poster, WebP or GIF the job made) linked to its video, else a link."""
    preview = row["media"]["preview"]
    if not preview:
        return _link(row, "video") if row["media"]["video"] else DASH
    return _link(row, f"<img class=\"thumb\" src=\"{esc(preview)}\" alt=\"preview\">")


def _quality(job: dict) -> dict:
    return (job.get("config") or {}).get("quality") or {}


def _kept_note(g: Gathered, job: dict) -> str:
    text = kept_below_text(g.gate.kept_below, _quality(job))
    return f" (<span class=\"bad\">{esc(text)}</span>)" if text else ""


def _tries(row: dict) -> str:
    """Each try's score, the kept one in bold."""
    tries, kept = row.get("quality_tries") or [], row.get("quality_kept_try")
    scores = [f"<b>{esc(num(t['clip_score']))}</b>" if i == kept else esc(num(t["clip_score"]))
              for i, t in enumerate(tries)]
    return f"{len(tries)}: " + ", ".join(scores)


def quality_gate(g: Gathered, job: dict) -> str:
    """The ok rows kept below the gate (ok by status and exit code, so only this section and the
    counts show them), and the rows each rule held back. Nothing for an output rendered
    without a gate."""
    rules = _rules(job)
    if not rules and not g.gate.kept_below and not g.rule_misses:
        return ""
    return ("<section id=\"gate\"><h2>Quality gate</h2>\n" + _kept(g, _quality(job))
            + _rule_counts(g, rules) + "</section>\n")


def _kept(g: Gathered, quality: dict) -> str:
    count = sum(g.gate.kept_below.values())
    if not count:
        return f"<p class=\"good\">Every scored ok row met {esc(gate_words(quality))}.</p>\n"
    body = "".join(
        f"<tr><td>{_link(r, _code(r.get('id')))}</td><td>{esc(num(r['score']))}</td>"
        f"<td class=\"mono\">{_tries(r)}</td>"
        f"<td class=\"prompt\"><bdi>{esc(r.get('prompt'))}</bdi></td></tr>\n" for r in g.kept)
    shown = "" if len(g.kept) == count else f" The first {len(g.kept):,} are listed."
    return (f"<p>{esc(kept_below_text(g.gate.kept_below, quality))}: ok rows whose kept try "
            f"misses a rule (<code>quality_passed</code> false).{shown}</p>\n"
            f"<table><tr><th>id</th><th>score</th><th>tries (kept in bold)</th><th>prompt</th>"
            f"</tr>\n{body}</table>\n")


def _rules(job: dict) -> list[tuple[str, str]]:
    """(rule as quality_failed_rules names it, on_fail) of the job's gate, in its order:
    quality.min_score, then quality.rules."""
    q = _quality(job)
    rules = [{"column": "clip_score", "min": q["min_score"], "on_fail": q.get("on_fail")}] \
        if q.get("min_score") is not None else []
    named = []
    for r in rules + list(q.get("rules") or []):
        try:
            rule = Rule(r["column"], r.get("min"), r.get("max"), r.get("on_fail") or "keep")
            named.append((rule.text, rule.on_fail))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # not a rule this version wrote
    return named


def _rule_counts(g: Gathered, rules: list[tuple[str, str]]) -> str:
    """Per rule, the ok rows kept and the failed rows that miss it (``quality_failed_rules``
    of the kept try), and the rows the gate rendered again."""
    on_fail = dict(rules)
    names = [text for text, _ in rules] + sorted(set(g.rule_misses) - set(on_fail))
    body = "".join(
        f"<tr><td><code>{esc(name)}</code></td><td>{esc(on_fail.get(name, DASH))}</td>"
        f"<td>{g.rule_misses.get(name, {}).get('ok', 0):,}</td>"
        f"<td>{g.rule_misses.get(name, {}).get('failed', 0):,}</td></tr>\n" for name in names)
    again = (f"{g.retried:,} row{'s' if g.retried != 1 else ''} rendered again "
             f"({g.extra_renders:,} more renders, seeds derived from the row's)."
             if g.retried else "No row was rendered again.")
    return (f"<p>Rows whose kept try misses each rule (<code>quality_failed_rules</code>). "
            f"{again}</p>\n<table class=\"rules\"><tr><th>rule</th><th>on_fail</th>"
            f"<th>ok rows kept</th><th>failed rows</th></tr>\n{body}</table>\n")


def failures(g: Gathered) -> str:
    head = "<section id=\"failures\"><h2>Failures</h2>\n"
    if not g.errors:
        return head + "<p class=\"good\">No failed rows.</p></section>\n"
    groups = []
    for code, count in sorted(g.errors.items(), key=lambda item: (-item[1], item[0])):
        examples = "".join(
            f"<tr><td><code>{esc(r.get('id'))}</code></td><td class=\"err\">{esc(r.get('error'))}"
            f"</td><td class=\"prompt\"><bdi>{esc(r.get('prompt'))}</bdi></td></tr>\n"
            for r in g.examples.get(code, []))
        groups.append(f"<details class=\"failure\" open><summary><code>{esc(code)}</code>: "
                      f"{count:,} row{'s' if count != 1 else ''}</summary>\n<table><tr><th>id"
                      f"</th><th>error</th><th>prompt</th></tr>\n{examples}</table></details>\n")
    total = sum(g.errors.values())
    return (head + f"<p>{total:,} failed row{'s' if total != 1 else ''} in {len(g.errors)} "
            f"error code"
            f"{'s' if len(g.errors) != 1 else ''}, most common first, with up to "
            f"{ERROR_EXAMPLES} examples each (<code>reelfarm status OUTPUT --failed</code> "
            f"lists them all).</p>\n" + "".join(groups) + "</section>\n")

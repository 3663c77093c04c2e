"""report.html: escaped, bounded, self-contained; and opened in a real headless Chromium, where
its videos play, no hostile prompt runs, and nothing outside the output is requested.

The browser is the system Chromium, driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: JSON messages ending in NUL on fds 3 and 4), so no client
package is needed. Without Chromium those tests skip, except under CI (``CI`` set), where they
fail: ``.ci/run`` installs it.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import html
import html.parser
import io
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import urllib.parse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import prompts, system_tool, tiny_config, write_prompts

from jobs.store import layout, manifest
from jobs.products.report.bins import Bins, score_widths
from jobs.products.report.gather import ERROR_EXAMPLES, SCORE_COLUMN, gather
from jobs.products.report.scores import LOWEST_ROWS, SCORE_BINS, SCORE_COLUMNS
from jobs.products.report.smallest import Smallest
from jobs.products.report.page import write_report
from jobs.products.report.text import PROMPT_CHARS
from jobs.store.hashset import row_hash
from jobs.store.job_file import OutputError
from rendering import storage

HOSTILE_SCRIPT = "<script>document.title='pwned'</script>"
HOSTILE_IMG = "\"><img src=x onerror=\"document.title='pwned2'\">"


# --------------------------------------------------------------------------------------------
# Synthetic outputs: shard manifests written directly, following manifest.SCHEMA.

# Gated outputs: the rules their job.json names, as quality_failed_rules names them.
CLIP_RULE, MOTION_RULE = "clip_score >= 25", "motion_score >= 0.5"


def synthetic_scores(index: np.ndarray, failed: np.ndarray) -> dict[str, np.ndarray]:
    """Each score column's values (NaN: unscored, as failed rows and a few others are)."""
    values = {"clip_score": (20 + 15 * np.sin(index * 0.37) ** 2, index % 7 == 3),
              "aesthetic_score": (5 + 2 * np.cos(index * 0.11), index % 5 == 1),
              "motion_score": (2 * np.abs(np.sin(index * 0.05)), index % 11 == 2)}
    return {name: np.where(failed | unscored, np.nan, v) for name, (v, unscored) in values.items()}


def _gate_columns(index: np.ndarray, failed: np.ndarray, scores: dict) -> dict:
    """The gate's columns for CLIP_RULE (retry, 3 renders) and MOTION_RULE (keep; and on every
    50th failed row), and duplicate_of on every 13th ok row."""
    missed = [[rule for rule, miss in ((CLIP_RULE, clip < 25), (MOTION_RULE, motion < 0.5))
               if miss] if not f else ([MOTION_RULE] if i % 50 == 49 else [])
              for i, f, clip, motion in zip(index.tolist(), failed.tolist(),
                                            scores["clip_score"].tolist(),
                                            scores["motion_score"].tolist())]
    tries = [[{"seed": i, "clip_score": 1.0}] * (3 if CLIP_RULE in m else 1)
             for i, m in zip(index.tolist(), missed)]
    duplicate = [f"row-{i - 1:07d}" if i % 13 == 5 and not f else None
                 for i, f in zip(index.tolist(), failed.tolist())]
    return {"quality_failed_rules": pa.array(missed, pa.list_(pa.string())),
            "quality_passed": pa.array([not m for m in missed]),
            "quality_tries": pa.array(tries, manifest.SCHEMA.field("quality_tries").type),
            "quality_kept_try": pa.array([len(t) - 1 for t in tries], pa.int32()),
            "duplicate_of": pa.array(duplicate, pa.string())}


def synthetic_output(root, rows: int, per_shard: int = 1000, scores: str | None = "some",
                     fail_every: int = 25, prompt=None, start_s: float = 1.7e9,
                     gated: bool = False) -> str:
    """An output of ``rows`` committed rows: every ``fail_every``-th failed (three error codes
    in turn), the rest ok with a video path; ``scores``: None (no score columns), "null" (all
    null) or "some" (``synthetic_scores``); ``gated``: the gate's columns (``_gate_columns``)
    and its rules in job.json. Returns its path."""
    assert set(SCORE_COLUMNS) <= set(manifest.SCHEMA.names)
    root = str(root)
    os.makedirs(os.path.join(root, layout.MANIFESTS_DIR), exist_ok=True)
    codes = ["invalid_prompt", "render_error", "encode_error"]
    for shard, start in enumerate(range(0, rows, per_shard)):
        index = np.arange(start, min(start + per_shard, rows))
        n = len(index)
        failed = index % fail_every == fail_every - 1
        rows_here = index.tolist()
        ids = [f"row-{i:07d}" for i in rows_here]
        videos = [None if f else f"videos/{i}.mp4" for i, f in zip(ids, failed.tolist())]
        columns = {f.name: pa.nulls(n, f.type) for f in manifest.SCHEMA}
        columns.update(
            id=pa.array(ids), row_index=pa.array(index, pa.int64()),
            occurrence=pa.array(np.zeros(n, np.int32)),
            prompt=pa.array([prompt(i) if prompt else f"a scene number {i}" for i in rows_here]),
            status=pa.array(np.where(failed, "failed", "ok")),
            error_code=pa.array([codes[(i // fail_every) % 3] if f else None
                                 for i, f in zip(rows_here, failed.tolist())]),
            error=pa.array([f"{codes[(i // fail_every) % 3]}: row {i} went wrong" if f else None
                            for i, f in zip(rows_here, failed.tolist())]),
            video_uri=pa.array(videos), bytes=pa.array(np.where(failed, 0, 4000), pa.int64()),
            seed=pa.array(index * 7919, pa.int64()),
            num_frames=pa.array(np.full(n, 16), pa.int32()),
            height=pa.array(np.full(n, 256), pa.int32()),
            width=pa.array(np.full(n, 256), pa.int32()),
            num_inference_steps=pa.array(np.full(n, 25), pa.int32()),
            guidance_scale=pa.array(np.full(n, 7.5)), fps=pa.array(np.full(n, 8), pa.int32()),
            artifacts=pa.array([[] if v is None else [{"name": "video", "path": v, "bytes": 4000,
                                                        "sha256": "0" * 64}] for v in videos],
                               manifest.SCHEMA.field("artifacts").type),
            attempts=pa.array(np.ones(n, np.int32)),
            committed_at=pa.array(np.full(n, start_s + 3.0 * shard)))
        values = synthetic_scores(index, failed)
        if scores == "some":
            columns.update({name: pa.array(v, from_pandas=True) for name, v in values.items()})
            columns["motion_static"] = pa.array(values["motion_score"] < 0.2, mask=np.isnan(
                values["motion_score"]))
        if gated:
            columns.update(_gate_columns(index, failed, values))
        table = pa.table(columns, schema=manifest.SCHEMA)
        if scores is None:  # a manifest from before scoring existed
            table = table.drop_columns(list(SCORE_COLUMNS))
        pq.write_table(table, os.path.join(root, layout.MANIFESTS_DIR,
                                           f"{layout.SHARD_PREFIX}{shard:08d}.parquet"))
    job = {"fingerprint": "0123456789abcdef", "counts": {"rows": rows},
           "settings": {"model.path": "tiny:modelscope"},
           "config": {"model": {"path": "tiny:modelscope"},
                      "render": {"num_frames": 16, "height": 256, "width": 256,
                                 "num_inference_steps": 25},
                      **({"quality": {"clip_model": "tiny:clip", "min_score": 25,
                                      "on_fail": "retry", "max_tries": 3,
                                      "rules": [{"column": "motion_score", "min": 0.5,
                                                 "max": None, "on_fail": "keep"}]}}
                         if gated else {})},
           "last_run": {"status": "finished", "started_at": start_s - 10, "finished_at":
                        start_s + 3.0 * (rows // per_shard), "seconds": 100.0, "startup_s": 10.0,
                        "rendering_s": 90.0, "rendered": rows, "videos_per_hour": 1234.5}}
    with open(os.path.join(root, layout.JOB_FILE), "w") as f:
        json.dump(job, f)
    return root


class Page(html.parser.HTMLParser):
    """What a browser's parser would make of the page: its tags, attributes and text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self._in = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in = tag if tag in ("script", "style") else None

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "script":
            self.scripts.append(data)
        elif self._in == "style":
            self.styles.append(data)
        else:
            self.text.append(data)

    def links(self) -> list[str]:
        return [v for _, attrs in self.tags for k, v in attrs.items()
                if k in ("src", "href", "poster") and v is not None]


def _page(output: str, **kwargs) -> tuple[str, Page]:
    uri = write_report(output, **kwargs)
    with open(uri, encoding="utf-8") as f:
        text = f.read()
    return text, Page(text)


# --------------------------------------------------------------------------------------------
# Unit tests: the page as text.

def test_hostile_ids_prompts_and_errors_show_as_text(tmp_path):
    out = synthetic_output(tmp_path / "out", 60, per_shard=20, fail_every=4,
                           prompt=lambda i: HOSTILE_SCRIPT if i % 2 else HOSTILE_IMG)
    table = pq.read_table(tmp_path / "out/manifests/shard-00000000.parquet")
    hostile = pa.array([f"{HOSTILE_IMG}-{i}" for i in range(table.num_rows)])
    table = table.set_column(table.column_names.index("id"), "id", hostile)
    table = table.set_column(table.column_names.index("error"), "error",
                             pa.array([HOSTILE_SCRIPT] * table.num_rows))
    pq.write_table(table, tmp_path / "out/manifests/shard-00000000.parquet")

    text, page = _page(out)
    assert [t for t, _ in page.tags].count("script") == 1  # the page's own, nothing from data
    assert "img" not in [t for t, _ in page.tags]
    assert not [k for _, attrs in page.tags for k in attrs if k.startswith("on")]
    shown = "".join(page.text)
    assert HOSTILE_SCRIPT in shown and HOSTILE_IMG in shown and f"{HOSTILE_IMG}-1" in shown
    assert "<script>document" not in text and "<img src=x" not in text


def test_size_is_bounded_by_the_sample_not_the_rows(tmp_path):
    long_prompt = "a very long prompt " * 1000  # 19 kB each: the page shows a few hundred chars
    small = len(_page(synthetic_output(tmp_path / "1k", 1_000, prompt=lambda i: long_prompt))[0])
    large = len(_page(synthetic_output(tmp_path / "10k", 10_000, prompt=lambda i: long_prompt))[0])
    assert large < 1.3 * small, (small, large)
    assert large < 150_000
    assert PROMPT_CHARS < 1000 < len(long_prompt)


def test_failures_are_grouped_by_code_with_a_few_examples(tmp_path):
    out = synthetic_output(tmp_path / "out", 400, per_shard=50, fail_every=4)  # 100 failed
    gathered = gather(out)
    assert gathered.errors == {"invalid_prompt": 34, "render_error": 33, "encode_error": 33}
    assert all(len(rows) == ERROR_EXAMPLES for rows in gathered.examples.values())
    assert gathered.examples["invalid_prompt"][0]["id"] == "row-0000003"  # first in input order
    text, page = _page(out)
    failures = text[text.index('id="failures"'):]
    assert failures.index("invalid_prompt</code>: 34 rows") < failures.index("encode_error")
    assert "100 failed rows in 3 error codes" in failures
    assert failures.count("<tr><td><code>row-") == 3 * ERROR_EXAMPLES


def test_no_network_a_pinned_script_and_relative_links(tmp_path):
    out = synthetic_output(tmp_path / "out", 300, per_shard=100)
    text, page = _page(out)
    assert not re.search(r"(?i)\b(https?|ftp|wss?):", text)  # no URL of any scheme
    csp = next(a["content"] for _, a in page.tags
               if a.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in csp and "media-src 'self'" in csp and "connect-src" not in csp
    assert text.index("Content-Security-Policy") < text.index("<style")  # before anything loads
    [script], [style] = page.scripts, page.styles
    for source, directive in ((script, "script-src"), (style, "style-src")):
        digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in csp
    assert "sortBy" in script and 'data-sort="score"' in text and 'id="grid"' in text
    links = page.links()
    assert links and all(link == "data:," or re.fullmatch(r"videos/row-\d{7}\.mp4", link)
                         for link in links), links
    videos = [a for t, a in page.tags if t == "video"]
    assert len(videos) == 48 and all(v["preload"] == "metadata" and "controls" in v for v in videos)


def test_unsafe_artifact_paths_are_not_linked_and_previews_are_posters(tmp_path):
    out = synthetic_output(tmp_path / "out", 8, per_shard=8, fail_every=100)
    path = tmp_path / "out/manifests/shard-00000000.parquet"
    table = pq.read_table(path)
    bad = ["../escape.mp4", "https://evil.example/x.mp4", "/etc/passwd", "javascript:alert(1)",
           "videos/../../x.mp4", "C:\\x.mp4"]
    artifacts = [[{"name": "video", "path": p, "bytes": 1, "sha256": "0"}] for p in bad] + [
        [{"name": "video", "path": "videos/a b#?.mp4", "bytes": 1, "sha256": "0"},
         {"name": "poster", "path": "videos/a.jpg", "bytes": 1, "sha256": "0"}],
        [{"name": "video", "path": "videos/c.mp4", "bytes": 1, "sha256": "0"},
         {"name": "gif", "path": "videos/c.gif", "bytes": 1, "sha256": "0"}]]
    table = table.set_column(table.column_names.index("artifacts"), "artifacts",
                             pa.array(artifacts, table.schema.field("artifacts").type))
    pq.write_table(table, path)
    text, page = _page(out)
    assert sorted(set(page.links())) == ["data:,", "videos/a%20b%23%3F.mp4", "videos/a.jpg",
                                         "videos/c.gif", "videos/c.mp4"]
    assert not re.search(r"(?i)\b(https?|javascript):", text)
    posters = {a["src"]: (a.get("poster"), a["preload"]) for t, a in page.tags if t == "video"}
    assert posters == {"videos/a%20b%23%3F.mp4": ("videos/a.jpg", "none"),
                       "videos/c.mp4": ("videos/c.gif", "none")}
    assert text.count("(no playable link)") == len(bad)


@pytest.mark.parametrize("scores", [None, "null"])
def test_without_scores_the_page_says_so(tmp_path, scores):
    text, page = _page(synthetic_output(tmp_path / "out", 100, per_shard=50, scores=scores))
    assert text.count("no scores") >= 2  # the distribution and the lowest rows
    assert 'data-sort="score"' not in text and "<svg" in text  # throughput is still plotted


def test_shards_with_and_without_scores_mix(tmp_path):
    out = synthetic_output(tmp_path / "out", 200, per_shard=100)
    old = tmp_path / "out/manifests/shard-00000000.parquet"  # as before scoring existed
    pq.write_table(pq.read_table(old).drop_columns([SCORE_COLUMN]), old)
    gathered = gather(out)
    assert gathered.rows == 200 and gathered.scores[SCORE_COLUMN].count == sum(
        1 for i in range(100, 200) if i % 25 != 24 and i % 7 != 3)


def _section(text: str, start: str, end: str = "</section>") -> str:
    """The page's text from ``start`` to the next ``end``."""
    begin = text.index(start)
    return text[begin:text.index(end, begin + len(start))]


@pytest.fixture(scope="module")
def scores_output(tmp_path_factory) -> str:
    """2,000 rows in uneven shards, every score, the gate's columns and near-duplicates."""
    return synthetic_output(tmp_path_factory.mktemp("scores") / "out", 2000, per_shard=300,
                            gated=True)


def test_each_score_shows_its_distribution_and_its_lowest_rows_in_order(scores_output):
    gathered = gather(scores_output)
    table = pa.concat_tables(manifest.iter_shards(scores_output))
    ids = table["id"].to_pylist()
    text, page = _page(scores_output)
    section = _section(text, 'id="scores"')
    parts = {chunk.split('"', 1)[0]: chunk for chunk in section.split('<h3 id="score-')[1:]}
    assert list(parts) == list(SCORE_COLUMNS)
    assert [d.column for d in gathered.shown_scores()] == list(SCORE_COLUMNS)
    bars = 0
    for column in SCORE_COLUMNS:
        values = table[column].to_numpy(zero_copy_only=False)
        scored = np.flatnonzero(np.isfinite(values))
        d = gathered.scores[column]
        assert d.count == len(scored) == sum(d.bins.counts.values()) < 2000
        assert (d.low, d.high) == (values[scored].min(), values[scored].max())
        assert d.mean == pytest.approx(values[scored].mean())
        assert len(d.bins.dense()) <= SCORE_BINS
        expected = sorted((values[i], row_hash(ids[i]), ids[i]) for i in scored)[:LOWEST_ROWS]
        assert [(r["id"], r["score"]) for r in d.lowest.rows()] == [(i, v) for v, _, i in expected]
        # On the page: the column's heading, its count, its histogram, its lowest rows in order.
        part = parts[column]
        assert f"{len(scored):,} scored ok rows" in part
        assert part.count('<rect class="bar"') == len(d.bins.dense())
        bars += len(d.bins.dense())
        shown = re.findall(r'<tr><td><a href="videos/(row-\d{7})\.mp4">video</a></td><td>([^<]+)'
                           r'</td><td><a href="videos/row-\d{7}\.mp4"><code>(row-\d{7})</code>',
                           part)
        assert [(i, v) for i, v, same in shown if i == same] == [
            (i, f"{v:.4g}") for v, _, i in expected]
    assert "motion_static</code>" in section and f"{gathered.static:,} flagged static" in section
    assert gathered.static == sum(1 for v in table["motion_static"].to_pylist() if v)
    assert text.count('<rect class="bar"') == bars + len(gathered.throughput.dense())


def test_the_gate_counts_the_rows_each_rule_held_back_and_the_near_duplicates(scores_output):
    rows = pa.concat_tables(manifest.iter_shards(scores_output)).to_pylist()
    text, page = _page(scores_output)
    gate = _section(text, 'id="gate"')
    for rule, on_fail in ((CLIP_RULE, "retry"), (MOTION_RULE, "keep")):
        ok, failed = (sum(1 for r in rows if r["status"] == status
                          and rule in r["quality_failed_rules"]) for status in ("ok", "failed"))
        assert ok and (failed or rule == CLIP_RULE)
        assert (f"<tr><td><code>{html.escape(rule)}</code></td><td>{on_fail}</td>"
                f"<td>{ok:,}</td><td>{failed:,}</td></tr>") in gate
    retried = [r for r in rows if len(r["quality_tries"]) > 1]
    assert f"{len(retried):,} rows rendered again ({2 * len(retried):,} more renders" in gate
    duplicates = sum(1 for r in rows if r["duplicate_of"] is not None)
    assert duplicates and (f"<th>Near-duplicates</th><td>{duplicates:,} ok rows marked "
                           f"<code>duplicate_of</code>") in _section(text, 'id="summary"')
    plain = _page(synthetic_output(scores_output + "-plain", 100))[0]  # no gate, no dedup
    assert 'id="gate"' not in plain and "Near-duplicates" not in plain


def test_a_score_without_values_has_no_section(tmp_path):
    out = synthetic_output(tmp_path / "out", 100, per_shard=50)
    for path in manifest.committed(out).shards:  # scored without an aesthetic model
        table = pq.read_table(path)
        index = table.column_names.index("aesthetic_score")
        pq.write_table(table.set_column(index, "aesthetic_score",
                                        pa.nulls(table.num_rows, pa.float64())), path)
    text, _ = _page(out)
    assert 'id="score-clip_score"' in text and 'id="score-motion_score"' in text
    assert "aesthetic_score" not in text


def test_workers_over_the_last_run_are_charted_per_stage_and_absent_from_older_outputs(
        tmp_path):
    out = synthetic_output(tmp_path / "out", 100, per_shard=50)
    assert 'id="workers"' not in _page(out)[0]  # written before job.json recorded them
    with open(os.path.join(out, layout.JOB_FILE)) as f:
        job = json.load(f)
    job["last_run"]["workers_over_time"] = [
        {"at": 1000.0, "workers": {"video": 1, "keyframe": 1}},
        {"at": 1030.0, "workers": {"video": 3, "keyframe": 1}},
        {"at": 1090.0, "workers": {"video": 2, "keyframe": 1}},
        {"at": 1120.0, "workers": {"video": 2, "keyframe": 1}}]
    with open(os.path.join(out, layout.JOB_FILE), "w") as f:
        json.dump(job, f)
    text, page = _page(out)
    section = text[text.index('id="workers"'):text.index("</section>", text.index('id="workers"'))]
    assert section.index("<h3>keyframe</h3>") < section.index("<h3>video</h3>")
    video = section[section.index("<h3>video</h3>"):]
    tips = re.findall(r"<title>[^<]*: (\d+) worker\(s\)</title>", video)
    # 60 bins over 120 s: two seconds each; 1 worker for 30 s, 3 for 60 s, then 2.
    assert tips == ["1"] * 15 + ["3"] * 30 + ["2"] * 15
    assert "1970-01-01 00:16:40 UTC" in video  # the run's start, on the axis


def test_the_sample_is_a_fixed_hash_sample_whatever_the_shards(tmp_path):
    a = synthetic_output(tmp_path / "a", 3000, per_shard=1000)
    b = synthetic_output(tmp_path / "b", 3000, per_shard=70)
    sample = [r["id"] for r in gather(a, sample_size=20).sample()]
    assert sample == [r["id"] for r in gather(b, sample_size=20).sample()]
    ok = [f"row-{i:07d}" for i in range(3000) if i % 25 != 24]
    assert sorted(sample) == sorted(sorted(ok, key=row_hash)[:20])
    first = _page(a)[0]
    assert _page(a)[0] == first  # same output, same bytes


def test_bins_widen_exactly_whatever_the_batches():
    values = np.random.default_rng(0).normal(30, 8, 5000)
    whole = Bins(score_widths(), 20)
    whole.add(values)
    batched = Bins(score_widths(), 20)
    for chunk in np.array_split(values, 37):
        batched.add(chunk)
    assert whole.width == batched.width and whole.counts == batched.counts
    assert sum(whole.counts.values()) == 5000 and len(whole.dense()) <= 20


def test_the_lowest_rows_are_the_same_whatever_the_batches_ties_included():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 5, 3000).astype(float)  # many ties: the hash orders them
    hashes = rng.integers(0, 2**64 - 1, 3000, dtype=np.uint64)
    expected = sorted(zip(values.tolist(), hashes.tolist(), range(3000)))[:LOWEST_ROWS]
    for batches in (1, 7, 300):
        kept = Smallest(LOWEST_ROWS)
        for chunk in np.array_split(np.arange(3000), batches):
            kept.offer(hashes[chunk], lambda picked, c=chunk: [{"i": int(c[p])} for p in picked],
                       values[chunk])
        assert [r["i"] for r in kept.rows()] == [i for *_, i in expected]


def test_a_path_without_an_output_is_an_error(tmp_path):
    with pytest.raises(OutputError, match="holds no reelfarm output"):
        write_report(str(tmp_path / "nothing"))


def test_written_to_an_object_store(tmp_path, s3_bucket):
    bucket, client = s3_bucket
    local = synthetic_output(tmp_path / "out", 50, per_shard=25)
    fs, _ = storage.filesystem(f"s3://{bucket}/out")
    fs.put(local + "/", f"{bucket}/out/", recursive=True)
    uri = write_report(f"s3://{bucket}/out")
    assert uri == f"s3://{bucket}/out/{layout.REPORT_FILE}"
    body = client.get_object(Bucket=bucket, Key=f"out/{layout.REPORT_FILE}")["Body"].read()
    assert b'src="videos/row-0000000.mp4"' in body and b"s3:" not in body


# --------------------------------------------------------------------------------------------
# A real Chromium, driven over the DevTools protocol on a pipe.

class Chromium:
    """The system Chromium, headless, in its own process group, killed by its own pid."""

    def __init__(self, exe: str, profile: str):
        cmd_read, self._cmd_write = os.pipe()
        self._resp_read, resp_write = os.pipe()

        def on_fds_3_and_4():  # in the child, before exec: the protocol's fixed descriptors
            commands = fcntl.fcntl(cmd_read, fcntl.F_DUPFD, 10)
            replies = fcntl.fcntl(resp_write, fcntl.F_DUPFD, 10)
            os.dup2(commands, 3)
            os.dup2(replies, 4)

        args = [exe, "--headless=new", "--no-sandbox", "--remote-debugging-pipe",
                f"--user-data-dir={profile}", "--autoplay-policy=no-user-gesture-required",
                "--no-first-run", "--no-default-browser-check", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-extensions", "--disable-breakpad", "--mute-audio",
                "--window-size=1280,1000", "about:blank"]
        self.proc = subprocess.Popen(args, preexec_fn=on_fds_3_and_4, close_fds=False,
                                     start_new_session=True, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_read)
        os.close(resp_write)
        self.events: list[dict] = []
        self._replies: dict[int, dict] = {}
        self._next_id = 0
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._resp_read, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            with self._changed:
                for message in map(json.loads, messages):
                    if "id" in message:
                        self._replies[message["id"]] = message
                    else:
                        self.events.append(message)
                self._changed.notify_all()
        os.close(self._resp_read)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout_s: float = 20) -> dict:
        with self._changed:
            self._next_id += 1
            call = self._next_id
        message = {"id": call, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._cmd_write, json.dumps(message).encode() + b"\0")
        with self._changed:
            if not self._changed.wait_for(lambda: call in self._replies, timeout_s):
                raise TimeoutError(f"Chromium did not answer {method} in {timeout_s} s")
            reply = self._replies.pop(call)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def wait_for(self, method: str, session: str, after: int, timeout_s: float = 20) -> dict:
        def found():
            return next((e for e in self.events[after:]
                         if e["method"] == method and e.get("sessionId") == session), None)
        with self._changed:
            if not self._changed.wait_for(found, timeout_s):
                raise TimeoutError(f"no {method} in {timeout_s} s")
            return found()

    def open(self, path: str) -> str:
        """A new tab showing the local file ``path``, loaded; returns its session."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"]
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        mark = len(self.events)
        self.send("Page.navigate", {"url": "file://" + urllib.parse.quote(path)}, session=session)
        self.wait_for("Page.loadEventFired", session, mark)
        return session

    def evaluate(self, session: str, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, session=session)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def session_events(self, session: str, *methods: str) -> list[dict]:
        with self._changed:
            return [e for e in self.events if e["method"] in methods
                    and e.get("sessionId") == session]

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout_s=5)
            self.proc.wait(10)
        except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            pass
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its group: renderer, GPU, zygote
            except ProcessLookupError:
                pass
            self.proc.wait(10)
            os.close(self._cmd_write)


def _chromium_or_skip() -> str:
    return system_tool("chromium", "chromium", "chromium-browser")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = _chromium_or_skip()
    chromium = Chromium(exe, str(tmp_path_factory.mktemp("chromium-profile")))
    try:
        yield chromium
    finally:
        chromium.close()
    assert chromium.proc.returncode is not None


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """A real tiny output: three rows, two hostile prompts, one blank prompt (failed)."""
    from jobs.config import validate
    from jobs.driver import render

    folder = tmp_path_factory.mktemp("report-output")
    rows = prompts(3) + [{"id": "hostile-script", "prompt": HOSTILE_SCRIPT},
                         {"id": "hostile-img", "prompt": HOSTILE_IMG},
                         {"id": "blank", "prompt": "   "}]
    src = write_prompts(folder / "prompts.parquet", rows)
    out = str(folder / "out")
    summary = render(validate(tiny_config(src, out, cluster={"backend": "inline"})),
                     progress=False)
    assert (summary.ok, summary.failed) == (5, 1)
    return out


_PLAY = """(async () => {
  const videos = Array.from(document.querySelectorAll('video'));
  const v = videos[0];
  await v.play();
  const start = performance.now();
  while (v.readyState < 2 && performance.now() - start < 10000) {
    await new Promise(r => setTimeout(r, 50));
  }
  await new Promise(r => setTimeout(r, 300));
  return {videos: videos.length, readyState: v.readyState, paused: v.paused,
          time: v.currentTime, error: v.error && v.error.code, width: v.videoWidth,
          title: document.title, text: document.body.innerText,
          images: document.querySelectorAll('img').length};
})()"""


def test_the_report_in_chromium_plays_its_videos_runs_nothing_hostile_and_stays_local(
        browser, rendered):
    path = write_report(rendered)
    assert path == os.path.join(rendered, layout.REPORT_FILE)
    session = browser.open(os.path.realpath(path))
    page = browser.evaluate(session, _PLAY)

    # 1. No script from a prompt ran, and the prompts read as text.
    assert page["title"] == f"reelfarm report: {os.path.basename(rendered)}"
    assert "pwned" not in page["title"] and page["images"] == 0
    assert HOSTILE_SCRIPT in page["text"] and HOSTILE_IMG in page["text"]
    assert "invalid_prompt" in page["text"]
    # 2. A video loads and plays from its relative link.
    assert page["videos"] == 5 and page["error"] is None
    assert page["readyState"] >= 2 and not page["paused"] and page["width"] == 32, page
    # 3. A screenshot that is not one flat colour.
    from PIL import Image

    shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    assert image.size[0] >= 800 and len(image.getcolors(image.size[0] * image.size[1])) > 10
    # 4. Every request stayed inside the output (or was inline data), and the page's policy
    #    blocked nothing of its own.
    root = "file://" + urllib.parse.quote(os.path.realpath(rendered)) + "/"
    urls = [e["params"]["request"]["url"]
            for e in browser.session_events(session, "Network.requestWillBeSent")]
    assert any(u.startswith(root + "videos/") for u in urls), urls
    assert all(u.startswith(root) or u.startswith("data:") for u in urls), urls
    logged = [e["params"]["entry"]["text"]
              for e in browser.session_events(session, "Log.entryAdded")]
    assert not [t for t in logged if "Content Security Policy" in t], logged
    assert not browser.session_events(session, "Runtime.exceptionThrown")


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A real tiny output with CLIP, aesthetic and motion scores (tiny:clip, tiny:aesthetic),
    a rule no row meets (kept, marked), and poster and WebP previews."""
    from jobs.config import validate
    from jobs.driver import render

    folder = tmp_path_factory.mktemp("report-scored")
    src = write_prompts(folder / "prompts.parquet", prompts(6) + [{"id": "blank", "prompt": ""}])
    out = str(folder / "out")
    quality = {"clip_model": "tiny:clip", "aesthetic_model": "tiny:aesthetic",
               "rules": [{"column": "motion_score", "min": 1000}]}
    summary = render(validate(tiny_config(src, out, cluster={"backend": "inline"},
                                          encode={"previews": ["poster", "webp"]},
                                          quality=quality)), progress=False)
    assert (summary.ok, summary.failed) == (6, 1)
    return out


def test_a_copied_output_shows_its_previews_and_sorts_by_score_in_chromium(browser, scored,
                                                                           tmp_path):
    copy = str(tmp_path / "copied")
    shutil.copytree(scored, copy)  # the page must work from wherever the output now is
    path = write_report(copy)
    text = open(path, encoding="utf-8").read()
    assert text.count('preload="none" poster="previews/') == 6  # the poster, best preview
    session = browser.open(os.path.realpath(path))
    order = browser.evaluate(session, """(async () => {
      const read = () => Array.from(document.querySelectorAll('#grid .card'),
                                    c => [parseFloat(c.dataset.score), parseInt(c.dataset.row)]);
      const before = read();
      document.querySelector('button[data-sort="score"][data-dir="1"]').click();
      const up = read();
      document.querySelector('button[data-sort="score"][data-dir="-1"]').click();
      const down = read();
      document.querySelector('button[data-sort="row"]').click();
      return {before, up, down, again: read()};
    })()""")
    scores = {row: score for score, row in order["before"]}
    assert len(scores) == 6 and all(s == s for s in scores.values())  # every row scored
    assert order["up"] == sorted(order["before"]) != order["before"]  # ties: row order
    assert order["down"] == sorted(order["before"], key=lambda sr: (-sr[0], sr[1]))
    assert order["again"] == order["before"] == sorted(order["before"], key=lambda sr: sr[1])
    page = browser.evaluate(session, _PLAY)  # a video plays from the copy (preload none)
    assert page["readyState"] >= 2 and not page["paused"], page
    assert "no scores" not in page["text"]

    root = "file://" + urllib.parse.quote(os.path.realpath(copy)) + "/"
    requests = {e["params"]["requestId"]: e["params"]["request"]["url"]
                for e in browser.session_events(session, "Network.requestWillBeSent")}
    assert all(u.startswith(root) or u.startswith("data:") for u in requests.values()), requests
    finished = {e["params"]["requestId"]
                for e in browser.session_events(session, "Network.loadingFinished")}
    posters = [r for r, u in requests.items() if u.startswith(root + "previews/")]
    assert len(posters) == 6 and set(posters) <= finished  # every poster loaded
    logged = [e["params"]["entry"]["text"]
              for e in browser.session_events(session, "Log.entryAdded")]
    assert not [t for t in logged if "Content Security Policy" in t], logged


_SCORES = """(async () => {
  const thumbs = Array.from(document.querySelectorAll('#scores img.thumb'));
  await Promise.all(thumbs.map(i => i.decode().catch(() => null)));
  const tables = {};
  document.querySelectorAll('#scores h3').forEach(h => {
    let next = h.nextElementSibling;
    while (next.tagName !== 'TABLE') { next = next.nextElementSibling; }
    tables[h.id] = Array.from(next.querySelectorAll('tr'), r => Array.from(r.cells,
      c => c.innerText)).slice(1);
  });
  const rules = Array.from(document.querySelectorAll('#gate table.rules tr'),
                           r => Array.from(r.cells, c => c.innerText)).slice(1);
  return {tables, rules, thumbs: thumbs.map(i => [i.naturalWidth, i.closest('a').href])};
})()"""


def test_each_score_and_its_lowest_rows_in_chromium(browser, scored):
    session = browser.open(os.path.realpath(write_report(scored)))
    page = browser.evaluate(session, _SCORES)
    rows = {r["id"]: r for r in pq.read_table(os.path.join(scored, layout.MANIFEST_FILE))
            .to_pylist() if r["status"] == "ok"}
    assert list(page["tables"]) == [f"score-{c}" for c in SCORE_COLUMNS]
    for column in SCORE_COLUMNS:  # six ok rows, each scored: all six, lowest first
        shown = [(cells[2], float(cells[1])) for cells in page["tables"][f"score-{column}"]]
        expected = sorted(((r[column], row_hash(i)), i) for i, r in rows.items())
        assert [i for i, _ in shown] == [i for _, i in expected]
        assert all(v == pytest.approx(rows[i][column], rel=1e-3) for i, v in shown)
    # A thumbnail per row shown, each its poster, decoded, linked to its video.
    root = "file://" + urllib.parse.quote(os.path.realpath(scored)) + "/"
    assert len(page["thumbs"]) == 3 * len(rows)
    assert all(width > 0 and href.startswith(root + "videos/") for width, href
               in page["thumbs"]), page["thumbs"]
    assert page["rules"] == [["motion_score >= 1000", "keep", str(len(rows)), "0"]]
    logged = [e["params"]["entry"]["text"]
              for e in browser.session_events(session, "Log.entryAdded")]
    assert not [t for t in logged if "Content Security Policy" in t], logged

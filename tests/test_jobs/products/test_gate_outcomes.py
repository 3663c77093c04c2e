"""Rows the quality gate kept below ``quality.min_score`` are ok rows (exit 0), so the render
summary, ``status``, ``job.json`` and the report must say how many there are and after how many
tries. A tiny CLIP scores far under 100, so with ``min_score: 100`` no row ever passes."""

from __future__ import annotations

import html
import json

import pyarrow.parquet as pq
import pytest
from helpers import prompts, run_cli
from helpers import write_config

from jobs.store import layout, manifest
from jobs.products.report.page import write_report
from rendering.quality import gate_words

ROWS = 3


def _render(folder, **quality) -> tuple:
    """Render ROWS prompts under the gate with the CLI; (its result, the output folder)."""
    config = write_config(folder, rows=prompts(ROWS), cluster={"backend": "inline"},
                          quality={"clip_model": "tiny:clip", "min_score": 100, **quality})
    return run_cli("render", config, "--quiet"), folder / "out"


@pytest.fixture(scope="module")
def retried(tmp_path_factory):
    return _render(tmp_path_factory.mktemp("retried"), on_fail="retry", max_tries=3)


def test_the_render_summary_counts_the_rows_kept_below_the_gate_and_their_tries(retried):
    result, _ = retried
    assert result.returncode == 0, result.stderr  # kept rows are ok rows
    assert (f"rows: {ROWS}  ok: {ROWS} ({ROWS} kept below quality.min_score 100 after 3 tries)"
            f"  failed: 0") in result.stdout


def test_status_and_job_json_count_them_from_the_manifests(retried):
    _, out = retried
    status = run_cli("status", str(out))
    assert status.returncode == 0, status.stderr
    assert f"  ok: {ROWS} ({ROWS} kept below quality.min_score 100 after 3 tries)" \
        in status.stdout.splitlines()
    counts = json.loads((out / layout.JOB_FILE).read_text())["counts"]
    assert counts == {"rows": ROWS, "ok": ROWS, "failed": 0, "committed": ROWS,
                      "kept_below_min_score": ROWS, "kept_below_min_score_tries": {"3": ROWS}}


def test_the_report_lists_each_kept_row_with_its_score_tries_and_video(retried):
    _, out = retried
    page = (out / layout.REPORT_FILE).read_text()
    gate = page[page.index("<section id=\"gate\">"):]
    gate = gate[:gate.index("</section>")]
    assert f"{ROWS} kept below quality.min_score 100 after 3 tries" in gate
    rows = pq.read_table(out / layout.MANIFEST_FILE).to_pylist()
    for row in rows:
        kept = row["quality_kept_try"]
        scores = [f"<b>{t['clip_score']:.4g}</b>" if i == kept else f"{t['clip_score']:.4g}"
                  for i, t in enumerate(row["quality_tries"])]
        assert (f"<tr><td><a href=\"{html.escape(row['video_uri'])}\"><code>{row['id']}</code>"
                f"</a></td><td>{row['clip_score']:.4g}</td><td class=\"mono\">3: "
                f"{', '.join(scores)}</td>") in gate
    run = page[page.index("<section id=\"summary\">"):page.index("<section id=\"throughput\">")]
    assert f"{ROWS} kept below quality.min_score 100 after 3 tries" in run


def test_the_gate_is_named_with_its_rules_not_as_min_score_alone():
    assert gate_words({"min_score": 30.0, "rules": []}) == "quality.min_score 30"
    assert gate_words({"min_score": 30.0, "rules": [{}, {}]}) == "quality.min_score 30 and 2 rules"
    assert gate_words({"min_score": None, "rules": [{}]}) == "1 quality rule"
    assert gate_words({}) == "the quality gate"


def test_on_fail_keep_counts_one_try_and_an_output_without_the_columns_says_nothing(tmp_path):
    # A second rule every row meets: the summaries name the whole gate, not min_score alone.
    result, out = _render(tmp_path, on_fail="keep",
                          rules=[{"column": "clip_score", "min": -100, "on_fail": "fail"}])
    assert result.returncode == 0, result.stderr
    kept = f"ok: {ROWS} ({ROWS} kept below quality.min_score 100 and 1 rule after 1 try)"
    assert kept in result.stdout and kept in run_cli("status", str(out)).stdout
    assert "<section id=\"gate\">" in (out / layout.REPORT_FILE).read_text()

    # As written before the gate existed: no quality columns, no quality settings.
    for path in manifest.committed(str(out)).shards:
        table = pq.read_table(path)
        pq.write_table(table.drop_columns([n for n in table.column_names
                                           if n.startswith("quality_")]), path)
    job = json.loads((out / layout.JOB_FILE).read_text())
    del job["config"]["quality"]
    (out / layout.JOB_FILE).write_text(json.dumps(job))
    status = run_cli("status", str(out))
    assert status.returncode == 0, status.stderr
    assert f"  ok: {ROWS}" in status.stdout.splitlines() and "kept below" not in status.stdout
    write_report(str(out))
    page = (out / layout.REPORT_FILE).read_text()
    assert "kept below" not in page and "id=\"gate\"" not in page

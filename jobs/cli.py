"""The ``reelfarm`` command line.

Exit codes of ``render``: 0 every row ok; 3 the job finished but some rows failed (each is in
the manifest with its error; ``--ok-if-rows-failed`` makes it 0); 1 the job could not run (one
line on stderr says what and how to fix it; ``--debug`` adds the traceback); 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time

import pyarrow as pa

from jobs.config import DEDUP_THRESHOLD
from jobs.products.dedup import BLOCK_ROWS
from jobs.products.nearest import SEARCHES
from rendering.pipelines.tiny import TINY_KINDS
from rendering.text.tiny import TINY_LM_KINDS

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_ROWS_FAILED = 0, 1, 2, 3


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The driver streams Parquet batch after batch: the system allocator returns them to the OS,
    # where Arrow's default pool keeps them (plan over 10M rows: 286 MB peak against 298 MB).
    pa.set_memory_pool(pa.system_memory_pool())
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("jobs").setLevel(logging.INFO)
    logging.getLogger("cluster").setLevel(logging.INFO)
    logging.getLogger("reelfarm").setLevel(logging.INFO)
    if not args.debug:
        # diffusers and transformers warn about config keys and deprecations on every load; the
        # variables reach the local workers too. Set either one to see them again.
        for library in ("DIFFUSERS", "TRANSFORMERS"):
            os.environ.setdefault(f"{library}_VERBOSITY", "error")
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C, or the driver's Interrupted (SIGTERM): a clean stop
        print("reelfarm: interrupted; committed work is kept: rerun the same command to resume",
              file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        if args.debug:
            raise
        print(f"reelfarm: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reelfarm", description="Batch video rendering on Ray.")
    parser.add_argument("--version", action="version", version=f"reelfarm {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, func, text in (("render", _render, "render a config's prompts to videos"),
                             ("plan", _plan, "count rows, shards, done and to do (no Ray, no model)"),
                             ("nightly", _nightly, "render or resume one night: {date} in the "
                                                   "config's URIs becomes its date")):
        cmd = sub.add_parser(name, help=text, parents=[common])
        cmd.add_argument("config", help="YAML job config")
        if name == "nightly":
            cmd.add_argument("--date", help="the night, YYYY-MM-DD (default: today in UTC)")
        cmd.add_argument("--input", help="input Parquet URI (input.uri)")
        cmd.add_argument("--output", help="output URI (output.uri)")
        cmd.add_argument("--workers", type=int, help="number of workers (cluster.num_workers)")
        cmd.add_argument("--address", help="Ray address: auto or host:port (cluster.address)")
        cmd.add_argument("--job-name", help="the job's name in its metrics, the reelfarm_job label "
                                            "(metrics.job_name; default: the output's folder name)")
        cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config key, e.g. --set render.num_frames=16")
        cmd.add_argument("--quiet", action="store_true", help="no progress output")
        if name != "plan":
            cmd.add_argument("--ok-if-rows-failed", action="store_true",
                             help="exit 0, not 3, when the job finished but some rows failed "
                                  "(they are still listed and in the manifest): for schedulers "
                                  "that count any other exit as a failed job")
        if name == "render":
            cmd.add_argument("--redo", action="append", choices=("failed", "damaged"), default=[],
                             help="repair: render committed rows again that failed, or whose "
                                  "objects verify finds missing or damaged (repeatable)")
        cmd.set_defaults(func=func)

    cmd = sub.add_parser("verify", parents=[common], help="check every manifest row against its stored video")
    cmd.add_argument("output", help="output URI")
    cmd.add_argument("--no-hash", action="store_true", help="check sizes only, skip sha256")
    cmd.add_argument("--remove-strays", action="store_true",
                     help="list the objects no manifest lists (and leftover temp objects) that "
                          "--yes would delete")
    cmd.add_argument("--yes", action="store_true", help="with --remove-strays: delete them")
    cmd.set_defaults(func=_verify)

    cmd = sub.add_parser("status", parents=[common], help="counts by status and the most common errors")
    cmd.add_argument("output", help="output URI")
    cmd.add_argument("--failed", action="store_true", help="list every failed row: id and error")
    cmd.set_defaults(func=_status)

    cmd = sub.add_parser("report", parents=[common], help="write report.html: summary, plots, gallery, failures")
    cmd.add_argument("output", help="output URI")
    cmd.set_defaults(func=_report)

    cmd = sub.add_parser("dedup", parents=[common],
                         help="find ok rows whose video embeddings are near-copies of earlier ones")
    cmd.add_argument("output", help="output URI")
    cmd.add_argument("--threshold", type=float, default=DEDUP_THRESHOLD,
                     help=f"cosine similarity at or above which a row is a duplicate (default "
                          f"{DEDUP_THRESHOLD})")
    cmd.add_argument("--block-rows", type=int, default=BLOCK_ROWS,
                     help=f"rows compared at once: memory is about 4 * N^2 bytes (default "
                          f"{BLOCK_ROWS})")
    cmd.add_argument("--search", choices=SEARCHES, default="exact",
                     help="exact (quadratic), or within k-means buckets: for millions of rows, "
                          "may miss a few pairs (default exact)")
    cmd.set_defaults(func=_dedup)

    cmd = sub.add_parser("make-tiny-model", parents=[common], help="write a random-weight pipeline, built offline")
    cmd.add_argument("directory")
    cmd.add_argument("--kind", choices=TINY_KINDS + TINY_LM_KINDS, default="modelscope",
                     help="pipeline family: " + ", ".join(TINY_KINDS) + "; or lm, a causal "
                          "language model for a text stage")
    cmd.add_argument("--replace", action="store_true",
                     help="empty a non-empty DIRECTORY first (else it is refused)")
    cmd.set_defaults(func=_make_tiny_model)
    return parser


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("reelfarm")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _load(args):
    """The job's config, its local paths made absolute here: the driver's folder is the one
    the user meant, whatever folder the workers run in."""
    from jobs.config import load_config, with_absolute_paths

    overrides = list(args.set)
    for flag, key in (("input", "input.uri"), ("output", "output.uri"),
                      ("workers", "cluster.num_workers"), ("address", "cluster.address")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "job_name", None) is not None:  # a name, even one YAML would read as a date
        overrides.append(f"metrics.job_name={json.dumps(args.job_name)}")
    return with_absolute_paths(load_config(args.config, overrides))


def _render(args) -> int:
    from jobs.driver import render

    cfg = _load(args)
    summary = render(cfg, progress=not args.quiet, redo=frozenset(args.redo))
    out = cfg.output.uri.rstrip("/")
    startup = (f"; workers started and loaded the model in {summary.startup_s:.1f} s"
               if summary.startup_s else "")
    if summary.nothing_to_do:
        print(f"nothing to do: every row is committed, and the input is unchanged since the run "
              f"that completed the output (checked in {summary.seconds:.2f} s)")
    else:
        print(f"rendered {summary.rendered} video(s) in {summary.seconds:.1f} s "
              f"({summary.videos_per_s:.2f} videos/s while rendering{startup}); "
              f"{summary.skipped} row(s) were already done")
    ok = _ok(summary.ok, summary.kept_below, cfg.quality.model_dump())
    print(f"rows: {summary.total_rows}  ok: {ok}  failed: {summary.failed}")
    for code, count in summary.top_errors:
        print(f"  {count} failed with {code}")
    print(f"videos:   {out}/videos/")
    print(f"manifest: {out}/manifest.parquet")
    print(f"report:   {out}/report.html")
    if not summary.complete:
        print("the output is not complete: rerun the same command to finish it", file=sys.stderr)
        return EXIT_ERROR
    return _finished(summary.failed, args)


def _ok(count: int, kept_below: dict[int, int], quality: dict) -> str:
    """The ok count, with the rows in it the quality gate kept short of its rules: they exit 0
    like any ok row, so the summary must say so."""
    from rendering.quality import kept_below_text

    kept = kept_below_text(kept_below, quality)
    return f"{count} ({kept})" if kept else str(count)


def _nightly(args) -> int:
    from jobs import nightly

    night = nightly.night_of(args.date)
    summary = nightly.run(_load(args), night, progress=not args.quiet)
    attempt = summary["attempts"][-1]
    out = summary["output_uri"].rstrip("/")
    print(f"night {summary['date']}: {summary['status']} (attempt {attempt['attempt']})")
    print(f"rows: {summary['rows']}  ok: {summary['ok']}  failed: {summary['failed']}  "
          f"pending: {summary['pending']}")
    print(f"this attempt rendered {attempt['rendered']} video(s) in {attempt['seconds']:.1f} s "
          f"({attempt['videos_per_hour']} videos/hour)")
    for error in summary["top_errors"]:
        print(f"  {error['count']} failed with {error['error_code']}")
    print(f"summary:  {out}/{nightly.SUMMARY_FILE}")
    print(f"manifest: {out}/manifest.parquet")
    if summary["status"] == "incomplete":
        print("the night is not complete: rerun the same command to resume it", file=sys.stderr)
        return EXIT_ERROR
    return _finished(summary["failed"], args)


def _finished(failed: int, args) -> int:
    """The exit code of a job that finished: 3 when rows failed, unless the caller asked for 0."""
    return EXIT_ROWS_FAILED if failed and not args.ok_if_rows_failed else EXIT_OK


def _plan(args) -> int:
    from jobs.config import fingerprint
    from jobs.input.dataset import open_dataset
    from jobs.store.manifest import committed_hashes
    from jobs.store.job_file import check_resumable, read_job
    from jobs.store.location import check_output_is_folder
    from jobs.input.plan import count_plan
    from jobs.input.preflight import preflight

    started = time.monotonic()
    cfg = _load(args)
    check_output_is_folder(cfg.output.uri)
    dataset = open_dataset(cfg.input.uri, cfg.input.carry_columns)
    check_resumable(cfg, read_job(cfg.output.uri))
    checks = preflight(cfg)
    shapes = checks.known
    counts = count_plan(dataset, cfg, committed_hashes(cfg.output.uri), checks)
    print(f"input:      {cfg.input.uri} ({len(dataset.files)} file(s))")
    print(f"output:     {cfg.output.uri} (fingerprint {fingerprint(cfg)})")
    if cfg.stages is None:
        print(f"model:      {cfg.model.path} " + _shape_source(*shapes.values()))
    for stage in cfg.stages or ():
        print(f"stage:      {stage.name}: {stage.model.path} " + (
            _text_stage(stage.text) if stage.text else _shape_source(shapes[stage.name])))
    print(f"rows:       {counts.rows}" + (f" ({cfg.variations} variations of each input row)"
                                           if cfg.variations > 1 else ""))
    print(f"done:       {counts.done}")
    refused = sum(counts.refused_rows(code) for code in counts.refused)
    print(f"to do:      {counts.todo} ({counts.invalid} invalid, of which {counts.duplicates} "
          f"duplicate ids and {refused} a stage's model would refuse; they are recorded as "
          f"failed without rendering)")
    for row_id, error in counts.invalid_examples:
        print(f"invalid:    {row_id!r}: {error}")
    if counts.invalid > len(counts.invalid_examples):
        print(f"            ... and {counts.invalid - len(counts.invalid_examples)} more")
    for code, reasons in sorted(counts.refused.items()):
        others = len(reasons) - 1
        print(f"refused:    {counts.refused_rows(code)} row(s) will fail as {code}, e.g. "
              f"{counts.example(code)}" + (f" (and {others} other reason(s))" if others else ""))
    print(f"shards:     {math.ceil(counts.todo / cfg.output.shard_size)} of up to "
          f"{cfg.output.shard_size} rows")
    print(f"planned in {time.monotonic() - started:.1f} s")
    return EXIT_OK


def _text_stage(text) -> str:
    return (f"(a text stage: rewrites each row's prompt, {text.system_prompt} system prompt, "
            f"{'greedy' if text.temperature == 0 else f'temperature {text.temperature:g}'}"
            f"{', on vLLM' if text.engine == 'vllm' else ''})")


def _shape_source(shapes) -> str:
    """Where plan's shape rules came from, or why it has none (the workers still check)."""
    if shapes.facts is not None:
        return f"(shape rules of {shapes.source})"
    return (f"(shape rules unknown: {shapes.source}; rows of a shape the model cannot render "
            f"are found when rendering)")


def _verify(args) -> int:
    from jobs.verify import hold_for_removal, verify

    if args.yes and not args.remove_strays:
        print("reelfarm verify: --yes deletes strays: give it with --remove-strays",
              file=sys.stderr)
        return EXIT_USAGE
    with hold_for_removal(args.output) if args.yes else contextlib.nullcontext():
        audit = verify(args.output, check_hashes=not args.no_hash)
        for problem in audit.problems[:50]:
            print(f"FAIL {problem}")
        if len(audit.problems) > 50:
            print(f"... and {len(audit.problems) - 50} more problems")
        removed = _strays(args, audit.strays) if args.remove_strays else 0
    problems = len(audit.problems) - removed
    verdict = "consistent" if not problems else f"{problems} problem(s)"
    print(f"{args.output}: {audit.rows} rows, {audit.ok} videos checked: {verdict}")
    return EXIT_OK if not problems else EXIT_ERROR


def _strays(args, strays: list[str]) -> int:
    """List the stray objects verify found, or with --yes delete them; return how many went."""
    from jobs.verify import check_strays_removable, remove_strays

    if not strays:
        print("no stray objects to remove")
        return 0
    if args.yes:
        remove_strays(args.output, strays)
        print(f"removed {len(strays)} stray object(s)")
        return len(strays)
    check_strays_removable(args.output)
    for path in strays[:50]:
        print(f"would remove {path}")
    if len(strays) > 50:
        print(f"... and {len(strays) - 50} more")
    print(f"{len(strays)} stray object(s) would be removed: add --yes to remove them")
    return 0


def _status(args) -> int:
    from jobs.run.timeline import steps
    from jobs.status import CAPACITY_EVENTS, failed_rows, print_running, status

    report = status(args.output)
    if args.failed:
        listed = 0
        for listed, (row_id, error) in enumerate(failed_rows(args.output), 1):
            print(f"{row_id}\t{error}")
        if not listed:  # on stderr: stdout stays the list, empty, for scripts that read it
            print(f"{args.output}: no failed rows", file=sys.stderr)
        return EXIT_OK
    expected = report["expected_rows"]
    print(f"{args.output}: {report['rows']} of {expected if expected is not None else '?'} rows "
          f"committed{' (complete)' if report['complete'] else ''}")
    if report["running"]:
        print_running(report["running"])
    for name, count in sorted(report["by_status"].items()):
        if name == "ok":
            count = _ok(count, report["kept_below"], report["quality"])
        print(f"  {name}: {count}")
    run = report["last_run"] or {}
    if len(report["by_stage"]) > 1:
        print("stages (rows made, failed; the last run's rate):")
        for name, counts in report["by_stage"].items():
            figures = run.get("stages", {}).get(name, {})
            rate = f", {figures['rows_per_s']:.2f} rows/s with {figures['workers']} worker(s)" \
                if figures.get("rows_per_s") is not None else ""
            if "cache_hits" in figures:  # a text stage's rewrites the last run took from its cache
                rate += f", {figures['cache_hits']} of {figures['made']} from the cache"
            print(f"  {name}: {counts.get('ok', 0)} made, {counts.get('failed', 0)} failed{rate}")
    if report["top_errors"]:
        print("most common errors:")
        for code, count, example in report["top_errors"]:
            print(f"  {count:>6}  {code}  e.g. {example}")
    run = report["last_run"]
    if run:
        rate, startup = run.get("videos_per_hour"), run.get("startup_s")
        left_out = f"start-up of {startup:.1f} s left out" if startup else "start-up left out"
        print(f"last run: {run.get('status')}, {run.get('rendered', 0)} rendered in "
              f"{run.get('seconds', 0)} s" + (f" ({rate} videos/hour, rendering time only: "
                                             f"{left_out})" if rate is not None else ""))
        capacity = run.get("capacity") or {}
        if capacity:
            print("workers: " + ", ".join(f"{count} {CAPACITY_EVENTS[name]}"
                                          for name, count in sorted(capacity.items())))
        over_time = run.get("workers_over_time") or []
        for stage in sorted({name for point in over_time for name in point["workers"]}):
            print(f"workers over time ({stage}): {steps(over_time, stage)}")
    return EXIT_OK


def _report(args) -> int:
    from jobs.products.report.page import write_report

    print(f"report: {write_report(args.output)}")
    return EXIT_OK


def _dedup(args) -> int:
    from jobs.products.dedup import dedup
    from jobs.products.report.page import write_report
    from jobs.store.layout import DUPLICATES_FILE

    found = dedup(args.output, args.threshold, args.block_rows, args.search)
    print(f"dedup: {found.duplicates} of {found.rows} ok rows are near-duplicates of earlier rows "
          f"(similarity >= {args.threshold:g}, {args.search} search), in {found.seconds:.1f} s; "
          f"listed in {DUPLICATES_FILE} and manifest.parquet's duplicate_of column")
    print(f"report: {write_report(args.output)} (it counts them)")
    return EXIT_OK


def _make_tiny_model(args) -> int:
    import shutil

    from rendering.pipelines.tiny import save_tiny_pipeline

    if os.path.isfile(args.directory):
        raise ValueError(f"{args.directory} is a file, not a folder")
    if os.path.isdir(args.directory) and os.listdir(args.directory):
        if not args.replace:
            raise ValueError(f"{args.directory} is not empty: choose an empty or new folder, or "
                             f"pass --replace to empty it first")
        shutil.rmtree(args.directory)

    if args.kind in TINY_LM_KINDS:
        from rendering.text.tiny import save_tiny_lm

        save_tiny_lm(args.directory)
        print(f"wrote a tiny random-weight causal language model to {args.directory}")
        return EXIT_OK
    save_tiny_pipeline(args.kind, args.directory)
    print(f"wrote a tiny random-weight {args.kind} pipeline to {args.directory}")
    return EXIT_OK


def _one_line(exc: BaseException) -> str:
    """The error on one line, with any credentials in URLs it quotes redacted."""
    from jobs.config import redact

    text = redact(" ".join(str(exc).split()))
    return text if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())

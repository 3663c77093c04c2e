"""Every path under an output, named in one place.

```
<output>/job.json            what made the output (config, fingerprint, versions, runs)
<output>/videos/<key>.mp4    one object per rendered row
<output>/previews/<key>.gif|.webp|.jpg   its previews, when encode.previews asks for them
<output>/stages/<stage>/<key>.png|.mp4   what an earlier stage made for a row (its keyframe)
<output>/manifests/shard-*.parquet   committed shards (a shard is committed when this exists)
<output>/manifests/segment-<generation>-<token>.parquet   shards folded into one (segments.py;
                             no token in the names of outputs made before it had one)
<output>/manifests/_checkpoint-<generation>.json  the segments, and the shards they absorbed
<output>/receipts/<key>.json rows stored but not yet committed (an interrupted run's work);
                             a multi-stage job's under receipts/<stage>/, one per stage done
<output>/manifest.parquet    every committed row, in input order, written at the end of a run
<output>/duplicates.parquet  the near-duplicate rows `reelfarm dedup` found (jobs/store/duplicates.py)
<output>/_SUCCESS            every input row is accounted for
<output>/report.html         the run's visual report (summary, plots, gallery, failures)
<output>/shards/NNNNN.tar, .parquet, .done   WebDataset shards, their indexes, their markers
<output>/_lease/<generation>.json   the lease of the run writing the output (not in FOLDERS:
                             its temp files are its own to clean)
<output>/_probes/<token>.json   what each worker stored at start for the driver to read back
                             (that they see one output); removed once read
<output>/cache/rewrites/<sha256>.json   a text stage's rewrites by content (unless it caches
                             them at a URI of its own): entries, not rows' artifacts
```
"""

from __future__ import annotations

JOB_FILE = "job.json"
VIDEOS_DIR = "videos"
MANIFESTS_DIR = "manifests"
RECEIPTS_DIR = "receipts"
MANIFEST_FILE = "manifest.parquet"
DUPLICATES_FILE = "duplicates.parquet"
SUCCESS_FILE = "_SUCCESS"
SHARD_PREFIX = "shard-"
SEGMENT_PREFIX = "segment-"
CHECKPOINT_PREFIX = "_checkpoint-"
LEASE_DIR = "_lease"
PROBES_DIR = "_probes"
SHARDS_DIR = "shards"
REPORT_FILE = "report.html"
PREVIEWS_DIR = "previews"
STAGES_DIR = "stages"
REWRITE_CACHE_DIR = "cache/rewrites"  # a text stage's cache under the output (see rendering.text)
FOLDERS = (VIDEOS_DIR, PREVIEWS_DIR, STAGES_DIR, MANIFESTS_DIR, RECEIPTS_DIR, SHARDS_DIR)  # every folder reelfarm writes objects into


"""Counts over committed rows (status, the report, job.json): gathered a table at a time, and
kept in the manifests' checkpoint for what is folded, so a running job's ``status`` reads only
what was committed since."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc


@dataclass
class Tally:
    """Counts over committed rows, gathered one shard at a time."""

    rows: int = 0
    by_status: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # error_code -> failed rows
    examples: dict = field(default_factory=dict)  # error_code -> its first error message
    by_stage: dict = field(default_factory=dict)  # stage -> Counter of what it did with rows
    kept_below: Counter = field(default_factory=Counter)  # tries -> ok rows kept under the gate

    @property
    def ok(self) -> int:
        return self.by_status.get("ok", 0)

    def add(self, table: pa.Table) -> None:
        """Counted in Arrow, not row by row in Python: a million rows take a second, not 20."""
        self.rows += table.num_rows
        self.by_status.update(_counts(table, ["status"]))
        if "stages" in table.column_names:
            flat = pc.list_flatten(table["stages"])
            stages = pa.table({"name": pc.struct_field(flat, "name"),
                               "status": pc.struct_field(flat, "status")})
            for (name, status), n in _counts(stages, ["name", "status"]).items():
                self.by_stage.setdefault(name, Counter())[status] += n
        failed = table.filter(pc.equal(table["status"], "failed"))
        for code, error in zip(failed["error_code"].to_pylist(), failed["error"].to_pylist()):
            self.errors[code] += 1
            self.examples.setdefault(code, error)
        self.add_gate(table)

    def add_gate(self, table: pa.Table) -> pa.Table | None:
        """Count the ok rows the quality gate kept below ``quality.min_score`` (they pass as ok,
        so only this makes them visible), by their tries, and return them. None: the rows
        predate the gate's columns."""
        if "quality_passed" not in table.column_names:
            return None
        kept = table.filter(pc.and_(pc.equal(table["status"], "ok"),
                                    pc.equal(table["quality_passed"], False)))
        self.kept_below.update(len(tries) for tries in kept["quality_tries"].to_pylist())
        return kept

    def gate_counts(self) -> dict:
        """The gate's counts as ``job.json`` keeps them."""
        by_tries = {str(tries): rows for tries, rows in sorted(self.kept_below.items())}
        return {"kept_below_min_score": sum(self.kept_below.values()),
                "kept_below_min_score_tries": by_tries}

    def top_errors(self, limit: int = 5) -> list[tuple[str, int, str]]:
        return [(code, n, self.examples[code]) for code, n in self.errors.most_common(limit)]

    def merge(self, other: "Tally") -> "Tally":
        merged = Tally(self.rows + other.rows, self.by_status + other.by_status,
                       self.errors + other.errors, {**other.examples, **self.examples},
                       {name: self.by_stage.get(name, Counter()) + other.by_stage.get(name, Counter())
                        for name in {*self.by_stage, *other.by_stage}},
                       self.kept_below + other.kept_below)
        return merged

    def to_json(self) -> dict:
        return {"rows": self.rows, "by_status": dict(self.by_status), "errors": dict(self.errors),
                "examples": self.examples,
                "by_stage": {name: dict(c) for name, c in self.by_stage.items()},
                "kept_below": {str(tries): n for tries, n in self.kept_below.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "Tally":
        return cls(data["rows"], Counter(data["by_status"]), Counter(data["errors"]),
                   dict(data["examples"]),
                   {name: Counter(c) for name, c in data["by_stage"].items()},
                   Counter({int(tries): n for tries, n in data["kept_below"].items()}))


def _counts(table: pa.Table, keys: list[str]) -> dict:
    """Rows per value of ``keys`` (a value, or a tuple of values for several)."""
    if not table.num_rows:
        return {}
    grouped = table.select(keys).group_by(keys).aggregate([([], "count_all")]).to_pylist()
    return {(g[keys[0]] if len(keys) == 1 else tuple(g[k] for k in keys)): g["count_all"]
            for g in grouped}

"""What each stage's worker would refuse of a row, found before the first stage spends a GPU.

A worker fails a row of a shape its model cannot render exactly, or one lacking an input its
pipeline requires, before rendering it. In a multi-stage job that refusal came after every
earlier stage had already rendered the row (a keyframe made for a video that never comes).
The preflight asks each stage's adapter the same questions, from the model's config files
alone (no torch, no weights: ``rendering.pipelines.known_shapes``), for the task each stage
would get: ``render`` fails such a row at once, with the stage's error code and name, and
``plan`` counts it the same way. A stage whose model cannot be read here is left to its
workers, which still check.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.config import JobConfig
from jobs.stages import Stage, job_stages
from rendering.contract import Artifact, Task
from rendering.pipelines import KnownShapes, known_shapes


@dataclass(frozen=True)
class Refusal:
    """A stage's worker would fail the row with this error code and message."""

    stage: str
    code: str
    message: str

    @property
    def error(self) -> str:
        return f"{self.code}: {self.message}"  # as the worker writes it


@dataclass(frozen=True)
class _StageCheck:
    stage: Stage
    known: KnownShapes


class Preflight:
    """Every stage's checks, in order: a row is refused by the first stage that would."""

    def __init__(self, checks: list[_StageCheck]):
        self._checks = checks

    @property
    def known(self) -> dict[str, KnownShapes]:
        """Each stage's shape facts and where they were read, for ``plan`` to show."""
        return {c.stage.name: c.known for c in self._checks}

    def refusal(self, task: Task) -> Refusal | None:
        previous: Artifact | None = None
        after_text = False  # a text stage hands on a prompt, no input
        for check in self._checks:
            stage, adapter, facts = check.stage, check.known.adapter, check.known.facts
            if stage.text is not None:  # it renders no shape; whatever it writes, it falls back
                after_text = True
                continue
            # Without the earlier stage's adapter, what it hands on is unknown: only shapes.
            staged = stage.task_given(task, previous) \
                if previous or not stage.takes or after_text else None
            after_text = False
            params = staged.params if staged else {**task.params, **stage.overrides}
            problem = facts and facts.problem(params["num_frames"], params["height"],
                                              params["width"])
            if problem:
                return Refusal(stage.name, "invalid_shape", problem)
            found = adapter.task_problem(staged) if adapter and staged else None
            if found:
                return Refusal(stage.name, *found)
            previous = Artifact(stage.artifact, "", 0, "", adapter.makes) if adapter else None
        return None


def preflight(cfg: JobConfig) -> Preflight:
    """The checks of every stage of ``cfg``, its models' config files read once."""
    return Preflight([_StageCheck(stage, TEXT_STAGE if stage.text is not None else
                                  known_shapes(stage.model.path, stage.model.pipeline,
                                               stage.model.revision))
                      for stage in job_stages(cfg)])


TEXT_STAGE = KnownShapes(None, "a text stage renders no shapes")

"""Swap a loaded pipeline's scheduler, refusing at load what diffusers would accept silently.

diffusers ignores config keys a scheduler does not know, and a scheduler built from a
flow-matching model's config quietly falls back to epsilon prediction (or the reverse): the
job would then render a wrong video for every row. Each such case is refused here with one line
that says what to set instead; it becomes the job's start error. A swap that goes ahead keeps
every setting of the model's scheduler the new class has, and one log line names those kept and
those dropped (CogVideoX's ``snr_shift_scale`` has no counterpart in most classes).
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import logging

logger = logging.getLogger(__name__)

NOISE_PREDICTIONS = ("epsilon", "v_prediction", "sample")
# FlowMatch* schedulers call the sigma shift ``shift``, flow-sigma solvers ``flow_shift`` (same
# formula): the model's value crosses the rename instead of the new class's default of 1.
_RENAMED = {"shift": "flow_shift", "flow_shift": "shift"}


def scheduler_names() -> list[str]:
    """Every scheduler class diffusers exports, including those whose package is missing."""
    import diffusers

    return sorted(n for n in dir(diffusers) if n.endswith("Scheduler"))


@functools.cache
def declared_scheduler_names() -> frozenset[str]:
    """The scheduler classes diffusers declares, read from its package source without importing
    it (importing diffusers imports torch, which the driver and ``plan`` never do). Empty when
    diffusers is not installed or its source is laid out otherwise: workers still check."""
    spec = importlib.util.find_spec("diffusers")
    if spec is None or not spec.origin:
        return frozenset()
    try:
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return frozenset()
    names = set()
    for node in ast.walk(tree):  # _import_structure["schedulers"].extend([...]) / .append(...)
        target = node.func.value if isinstance(node, ast.Call) \
            and isinstance(node.func, ast.Attribute) else None
        if isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant) \
                and target.slice.value == "schedulers":
            names.update(c.value for c in ast.walk(node) if isinstance(c, ast.Constant)
                         and isinstance(c.value, str) and c.value.endswith("Scheduler"))
    return frozenset(names)


def unknown_scheduler(name: str, known) -> str | None:
    """Why ``name`` is no scheduler of ``known`` (with the closest name), or None."""
    if name in known:
        return None
    hint = _close(name, known, suffix="Scheduler")
    return (f"{name!r} is not a diffusers scheduler{f' (did you mean {hint}?)' if hint else ''}; "
            "list them with: python -m rendering.pipelines.schedulers")


def check_scheduler(name: str, overrides: dict | None = None):
    """Return the scheduler class ``name``, refusing an unknown name or override key.

    Needs no model, so the config layer may call it (it imports diffusers, and with it torch).
    """
    import diffusers
    from diffusers import SchedulerMixin
    from diffusers.utils import DummyObject

    cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if not (isinstance(cls, DummyObject)
            or isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"model.scheduler: {unknown_scheduler(name, scheduler_names())}")
    if isinstance(cls, DummyObject):
        return cls  # its settings are only known where its package is installed
    known = _settings(cls)
    unknown = [k for k in overrides or {} if k not in known]
    if unknown:
        hints = [h for h in (_close(k, known) for k in unknown) if h]
        raise ValueError(f"model.scheduler_config: {name} has no setting "
                         f"{', '.join(repr(k) for k in unknown)} "
                         + (f"(did you mean {', '.join(hints)}?)" if hints
                            else f"(it has: {', '.join(sorted(known))})"))
    return cls


def apply_scheduler(pipe, name: str, overrides: dict) -> None:
    """Replace ``pipe.scheduler`` with ``name`` built from the model's scheduler config plus
    ``overrides``; raise ValueError (one line) when it could not run or would mis-predict."""
    from diffusers.utils import DummyObject

    cls = check_scheduler(name, overrides)
    if isinstance(cls, DummyObject):
        missing = [b for b in cls._backends if importlib.util.find_spec(b) is None] \
            or list(cls._backends)
        raise ValueError(f"model.scheduler: {name} needs {' and '.join(missing)}, which is not "
                         f"installed on the worker (pip install {' '.join(missing)})")
    old = pipe.scheduler
    carried, kept, dropped = _carried(old, cls, overrides)
    try:
        new = cls.from_config(carried, **overrides)
    except Exception as e:  # noqa: BLE001 - any refusal of the values becomes one clear line
        raise ValueError(f"model.scheduler: {name} cannot be built from the model's scheduler "
                         f"config and model.scheduler_config: "
                         f"{' '.join(f'{type(e).__name__}: {e}'.split())}") from None
    problem = _mismatch(type(pipe).__name__, _expects(type(old), old.config), cls, new.config,
                        overrides, _shift(old))
    if problem:
        raise ValueError(problem)
    _log_carried(name, kept, dropped)
    pipe.scheduler = new


def _carried(old, cls, overrides: dict) -> tuple[dict, list[str], list[str]]:
    """The model's scheduler settings that ``cls`` takes, by ``cls``'s name for them; how the
    log names those kept; and those ``cls`` has no setting for.

    The model's settings are those its scheduler config sets. Keys its file leaves out (diffusers
    lists them in ``_use_default_values``) take the new class's defaults, as diffusers' own
    recipes swap schedulers (ModelScope's config sets no ``timestep_spacing``: DPMSolver keeps
    its own). Keys the old config holds but its class does not read (another class's stale
    copies), private keys, and what ``overrides`` sets are not the model's settings.
    """
    defaulted = set(old.config.get("_use_default_values", ()))
    old_keys, new_keys = _settings(type(old)) - defaulted, _settings(cls)
    carried, kept, dropped = {}, [], []
    for key in sorted(old_keys):
        name = key if key in new_keys else _RENAMED.get(key)
        if name not in new_keys or name in old_keys and name != key:
            dropped.append(key)
        elif name not in overrides:
            carried[name] = old.config[key]
            kept.append(key if name == key else f"{key} (as {name})")
    return carried, kept, dropped


def _log_carried(name: str, kept: list[str], dropped: list[str]) -> None:
    """One line naming what of the model's scheduler config the swap kept and dropped."""
    line = f"model.scheduler {name}: " + (f"kept the model's {', '.join(kept)}" if kept
                                         else "kept none of the model's settings")
    if dropped:
        line += (f"; dropped {', '.join(dropped)} ({name} has no such "
                 f"setting{'s' if len(dropped) > 1 else ''})")
    logger.log(logging.WARNING if dropped else logging.INFO, line)


def _mismatch(model: str, has: str | None, cls, config, overrides: dict,
              shift: float) -> str | None:
    """Why scheduler ``cls`` with ``config`` would mis-read a model whose own scheduler reads
    ``has`` (see ``_expects``); None when it fits or the model's kind is unknown."""
    name, wants = cls.__name__, _expects(cls, config)
    flow_capable = "use_flow_sigmas" in _settings(cls)
    if has == "flow" and wants != "flow":
        fix = ("{prediction_type: flow_prediction, use_flow_sigmas: true, flow_shift: "
               f"{overrides.get('flow_shift', shift)}}}")
        if flow_capable:
            return (f"model.scheduler: {model} is a flow-matching model but {name} as configured "
                    f"expects {_describe(config)}; set model.scheduler_config: {fix}")
        return (f"model.scheduler: {model} is a flow-matching model and {name} cannot drive "
                "one; use a FlowMatch* scheduler such as FlowMatchEulerDiscreteScheduler, or "
                "UniPCMultistepScheduler / DPMSolverMultistepScheduler with "
                f"model.scheduler_config: {fix}")
    if has not in NOISE_PREDICTIONS or wants == has:
        return None
    if wants in NOISE_PREDICTIONS:
        fix = "drop it" if "prediction_type" in overrides else f"set it to {has}"
        return (f"model.scheduler_config: {name} would read prediction_type {wants} but {model} "
                f"predicts {has} (per its scheduler config); {fix}")
    if flow_capable:
        return (f"model.scheduler: {model} predicts {has} (a noise-schedule model) but {name} as "
                f"configured expects {_describe(config)}; drop prediction_type and "
                "use_flow_sigmas from model.scheduler_config")
    what = "is a flow-matching scheduler" if wants == "flow" else \
        "is not a sampler for epsilon, v-prediction or flow-matching models"
    return (f"model.scheduler: {model} predicts {has} (a noise-schedule model) and {name} {what}; "
            "use one such as DPMSolverMultistepScheduler, UniPCMultistepScheduler or "
            "EulerDiscreteScheduler")


def _expects(cls, config) -> str | None:
    """What model output a scheduler with this config reads: "flow" (flow-matching velocity),
    a noise prediction type ("epsilon", ...), "half-flow" (flow set up only halfway, which
    mis-reads any model), or None when it cannot tell."""
    keys = _settings(cls)
    prediction = config.get("prediction_type") if "prediction_type" in keys else None
    flow_sigmas = bool(config.get("use_flow_sigmas")) if "use_flow_sigmas" in keys else False
    if prediction == "flow_prediction" or flow_sigmas:
        return "flow" if prediction == "flow_prediction" and flow_sigmas else "half-flow"
    if prediction is not None:
        return prediction if prediction in NOISE_PREDICTIONS else None
    if keys & {"beta_schedule", "trained_betas"}:
        return "epsilon"  # a beta schedule and no prediction_type setting (IPNDM, RePaint)
    compatibles = {getattr(c, "__name__", c) for c in getattr(cls, "_compatibles", ())}
    if "shift" in keys or "FlowMatchEulerDiscreteScheduler" in compatibles:
        return "flow"  # FlowMatch*, FlowMap*, LTX's rectified-flow Euler, ...
    return None


def _describe(config) -> str:
    return (f"{config.get('prediction_type')} with use_flow_sigmas="
            f"{str(bool(config.get('use_flow_sigmas'))).lower()}")


def _shift(scheduler) -> float:
    keys = _settings(type(scheduler))
    return next((scheduler.config[k] for k in ("flow_shift", "shift") if k in keys), 3.0)


def _settings(cls) -> set[str]:
    """The config keys ``cls.from_config`` passes on; diffusers drops any other silently."""
    return cls._get_init_keys(cls) - {"self", "kwargs"} - set(cls.ignore_for_config)


def _close(word: str, choices, suffix: str = "") -> str | None:
    """The choice closest to ``word``, compared case-blind and without a shared ``suffix``."""
    by_lower = {c.lower().removesuffix(suffix.lower()): c for c in choices}
    word = word.lower().removesuffix(suffix.lower())
    match = difflib.get_close_matches(word, list(by_lower), n=1, cutoff=0.6)
    return by_lower[match[0]] if match else None


if __name__ == "__main__":
    print("\n".join(scheduler_names()))

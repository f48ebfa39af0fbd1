"""The search space file: which config keys a search varies, over which values, judged by which metric.

    metric = "val_acc"          # optional: default the config's train.best_metric and its direction
    pruner = "median"           # optional: median (default), hyperband or none,
                                # or { worse_than = 0.2 }: stop any trial whose metric is worse at an epoch
    [params]
    "optim.lr" = { low = 1e-4, high = 3e-2, log = true }
    "train.epochs" = { low = 2, high = 6 }              # ints when both ends are ints
    "optim.weight_decay" = { low = 0.0, high = 0.1, step = 0.02 }
    "data.augment" = { choices = ["standard", "crop", "trivialaugment"] }
    "optim.lr" = { around = 3e-3, factor = 10 }         # log range lr/10 .. lr*10 (e.g. lr_find's suggestion)

Read and checked once, before any trial: a key the config schema does not know, a value it
refuses (each end of a range and every choice is resolved with the run's config and overrides,
through the same `load_config` a run uses), an empty range or a form this file does not take is
one `error:` line naming the key and what would work.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configs.errors import ConfigError
from configs.schema import all_keys
from trainer.task.best_metric import BestMetric, best_metric

PRUNERS = ("median", "hyperband", "none")
_TOP_KEYS = ("metric", "pruner", "params")
_RANGE_KEYS = {"low", "high", "log", "step"}
_AROUND_KEYS = {"around", "factor"}
# Keys the search sets for each trial itself.
_SEARCH_OWNS = ("run.dir", "run.resume", "wandb.group", "wandb.name")


@dataclass(frozen=True)
class Param:
    """One varied key: a range (`low`..`high`, `log`, `step`) or a list of `choices`."""

    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    @property
    def is_int(self) -> bool:
        return not self.choices and all(type(v) is int for v in (self.low, self.high))

    def edge_values(self) -> list:
        """The values the schema must accept before the search starts: both ends, every choice."""
        return list(self.choices) if self.choices else [self.low, self.high]

    def suggest(self, trial) -> Any:
        """The trial's value, asked of Optuna's trial (`trial.suggest_*`)."""
        if self.choices:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.is_int:
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log, step=self.step)


@dataclass
class SearchSpace:
    params: list[Param]
    metric: BestMetric
    pruner: str = "median"
    worse_than: float | None = None  # pruner "threshold": the metric value a trial's epochs must beat
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    @property
    def pruner_text(self) -> str:
        return f"worse_than {self.worse_than:g}" if self.pruner == "threshold" else self.pruner


def override_text(key: str, value: Any) -> str:
    """`key=value` as a run's command line takes it (strings verbatim, the rest as TOML)."""
    if isinstance(value, bool):
        return f"{key}={'true' if value else 'false'}"
    if isinstance(value, str):
        return f"{key}={value}"
    return f"{key}={json.dumps(value)}"  # numbers and lists: JSON's spelling is TOML's


def read_space(path: str | Path, task: str, default_metric: str) -> SearchSpace:
    """Parse the space file (not yet checked against a config: `check_space` does that)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"space file not found: {path} (a TOML file with a [params] table, see docs/search.md)")
    try:
        tables = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    unknown = [k for k in tables if k not in _TOP_KEYS]
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {path}; a space file has: {', '.join(_TOP_KEYS)}")
    params = tables.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{path} has no [params] table of keys to vary, e.g. "
                          '[params] "optim.lr" = { low = 1e-4, high = 3e-2, log = true }')
    pruner, worse_than = read_pruner(tables.get("pruner", "median"), path)
    metric_name = tables.get("metric", default_metric)
    if not isinstance(metric_name, str):
        raise ConfigError(f"metric in {path} must be a metric name such as \"val_acc\", got {metric_name!r}")
    try:
        metric = best_metric(task, metric_name)
    except ConfigError as e:
        raise ConfigError(f"metric in {path}: {e}") from None
    return SearchSpace([parse_param(key, spec, path) for key, spec in params.items()], metric, pruner, worse_than,
                       str(path))


def read_pruner(value: Any, path: Path) -> tuple[str, float | None]:
    """`pruner = "median"` (or another of PRUNERS), or `{ worse_than = x }`: ("threshold", x)."""
    if isinstance(value, dict):
        bound = value.get("worse_than")
        if set(value) != {"worse_than"} or isinstance(bound, bool) or not isinstance(bound, (int, float)) \
                or not math.isfinite(bound):
            raise ConfigError(f"pruner = {value!r} in {path}: the table form is {{ worse_than = <a value of the "
                              "metric> }, e.g. pruner = { worse_than = 0.2 }")
        return "threshold", float(bound)
    if value not in PRUNERS:
        raise ConfigError(f"pruner = {value!r} in {path} is not one of: {', '.join(map(repr, PRUNERS))} "
                          "(or { worse_than = <a value of the metric> })")
    return value, None


def parse_param(key: str, spec: Any, path: str | Path = "the space file") -> Param:
    """One `[params]` entry; every refusal names the key and the forms that work."""
    where = f"[params] {key!r} in {path}"
    if key not in all_keys():
        raise ConfigError(f"{where}: unknown config key{_close_key(key)} (`python launch/train.py --keys` lists them)")
    if key in _SEARCH_OWNS:
        raise ConfigError(f"{where}: the search sets {key} for each trial itself; vary a training key")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a table: {{ low = .., high = .. }} or {{ choices = [..] }}")
    if "choices" in spec:
        extra = set(spec) - {"choices"}
        if extra:
            raise ConfigError(f"{where}: {sorted(extra)[0]!r} does not go with choices")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list, e.g. choices = [\"crop\", \"standard\"]")
        if len(set(map(json.dumps, choices))) < len(choices):
            raise ConfigError(f"{where}: choices {choices} repeat a value")
        return Param(key, choices=tuple(choices))
    if "around" in spec:
        return _around(key, spec, where)
    extra = set(spec) - _RANGE_KEYS
    if extra or not {"low", "high"} <= set(spec):
        wrong = sorted(extra)[0] if extra else "low and high"
        raise ConfigError(f"{where}: {wrong!r} is not a form this file takes; use {{ low = .., high = .., log = true }},"
                          " { choices = [..] } or { around = .., factor = .. }")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for name, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ConfigError(f"{where}: {name} must be a number, got {value!r}")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    if not low < high:
        raise ConfigError(f"{where}: the range {low} .. {high} is empty; low must be below high")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
    if log and step is not None:
        raise ConfigError(f"{where}: step and log = true do not go together (Optuna samples one or the other)")
    if step is not None and step <= 0:
        raise ConfigError(f"{where}: step must be above 0, got {step}")
    return Param(key, low, high, log, step)


def _around(key: str, spec: dict, where: str) -> Param:
    """`{ around = centre, factor = f }`: the log range centre/f .. centre*f."""
    extra = set(spec) - _AROUND_KEYS
    if extra:
        raise ConfigError(f"{where}: {sorted(extra)[0]!r} does not go with around (around = .., factor = ..)")
    centre, factor = spec["around"], spec.get("factor", 10)
    for name, value in (("around", centre), ("factor", factor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: {name} must be a number, got {value!r}")
    if centre <= 0 or factor <= 1:
        raise ConfigError(f"{where}: around must be above 0 and factor above 1, got around = {centre}, "
                          f"factor = {factor}")
    return Param(key, float(centre) / factor, float(centre) * factor, log=True)


def _close_key(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_space(space: SearchSpace, config: str | None, overrides: list[str]) -> None:
    """Every end of every range and every choice, resolved with the run's config and overrides as a
    trial would be: the schema's refusal (and the data and model layers' rules) become one line
    naming the space file's key."""
    from trainer.assemble.run_config import load_config

    load_config(config, overrides)  # the config's own faults are its own, not a parameter's
    for param in space.params:
        for value in param.edge_values():
            try:
                load_config(config, [*overrides, override_text(param.key, value)])
            except ConfigError as e:
                raise ConfigError(f"[params] {param.key!r} in {space.source}: value {value!r} is refused: {e}") from None


def check_overrides(overrides: list[str]) -> None:
    """The search owns each trial's run folder: the user's overrides must not set it."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in ("run.dir", "run.resume"):
            raise ConfigError(f"{key} is set by the search (each trial runs in --out DIR/trial-NNNN); "
                              f"drop {item!r}")

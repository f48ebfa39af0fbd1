"""The order of a run's classes: which class gets index 0, 1, 2, ... One rule for every source
(data.sources), so the same labels get the same indices from a folder, a CSV, a dataset or shards.

The rule:
  1. A recorded order wins. A run that resumes keeps the `class_names` its checkpoint recorded,
     and a checkpoint that predicts or evaluates keeps its own, whatever rule was in force when
     they were written. (It applies when the source has exactly those names; other names are
     refused where it matters: resuming, evaluating the run's own split.)
  2. Otherwise, names that are all integers written in ASCII digits (an optional leading minus:
     "0", "1", "10", "-3") sort as numbers: 0, 1, 2, ..., 10, 11.
  3. Any other set of names sorts as text, by code point (Python's `sorted`): "Cat" before
     "cat", "class10" before "class2". This is how class folders have always been sorted.
A single non-integer name makes the whole set sort as text (rule 3).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_INTEGER = re.compile(r"-?[0-9]+")


def class_order(names: Iterable[str], recorded: Sequence[str] | None = None) -> list[str]:
    """The classes `names` (duplicates ignored) in the order the module's rule gives; `recorded`
    (a checkpoint's class_names) when it holds exactly the same names."""
    distinct = set(names)
    if recorded is not None and len(recorded) == len(distinct) and set(recorded) == distinct:
        return list(recorded)
    if distinct and all(_INTEGER.fullmatch(name) for name in distinct):
        # The text breaks ties ("07" and "7"): the order never depends on the set's iteration order.
        return sorted(distinct, key=lambda name: (int(name), name))
    return sorted(distinct)

"""Class groups for LFME: the classes split into many / medium / few groups by training-image count.

One expert per group is an ordinary dermlab run with ``data.class_subset`` = the group's classes
(:mod:`dermlab.training.experts`); the student distils from them (:mod:`dermlab.training.distillation`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dermlab.errors import ConfigError

__all__ = ["ClassGroup", "group_names", "group_classes_by_count"]

log = logging.getLogger(__name__)


@dataclass
class ClassGroup:
    """One group of classes with their training-image counts, most frequent first."""

    name: str
    classes: list[str]
    counts: list[int]


def group_names(number: int) -> list[str]:
    """``many, medium, few`` for 3 groups, ``many, few`` for 2, else ``group1 ... groupK``."""
    if number == 3:
        return ["many", "medium", "few"]
    if number == 2:
        return ["many", "few"]
    return [f"group{i + 1}" for i in range(number)]


def group_classes_by_count(
    counts: Mapping[str, int],
    groups: int = 3,
    thresholds: Sequence[int] | None = None,
    min_classes: int = 2,
) -> list[ClassGroup]:
    """Split classes into groups by training-image count, most frequent group first.

    With ``thresholds`` (e.g. ``[500, 200]``): a class with ``n >= 500`` images is in the first group, ``200 <= n
    < 500`` in the second, the rest in the last. Without: natural breaks of ``log(n)`` into ``groups`` contiguous
    groups of at least ``min_classes`` classes (the split with the least within-group spread of log counts),
    since a group of one class has nothing to distil (its softmax is always 1).
    """
    ordered = sorted(counts.items(), key=lambda item: (-int(item[1]), item[0]))
    names = [name for name, _ in ordered]
    values = [int(n) for _, n in ordered]
    if thresholds is not None:
        cuts = sorted({int(t) for t in thresholds}, reverse=True)
        if len(cuts) != len(list(thresholds)) or any(t <= 0 for t in cuts):
            raise ConfigError(f"class-group thresholds must be distinct positive counts, got {list(thresholds)}")
        labels = group_names(len(cuts) + 1)
        members: list[list[int]] = [[] for _ in labels]
        for position, n in enumerate(values):
            members[sum(n < cut for cut in cuts)].append(position)
        result = [
            ClassGroup(label, [names[i] for i in idx], [values[i] for i in idx]) for label, idx in zip(labels, members)
        ]
        for group in result:
            if len(group.classes) < min_classes:
                raise ConfigError(
                    f"class group {group.name!r} (thresholds {cuts}) has {len(group.classes)} class(es) "
                    f"{group.classes}; each group needs at least {min_classes}"
                )
        return result
    if groups < 1 or groups * min_classes > len(names):
        raise ConfigError(
            f"cannot split {len(names)} classes into {groups} groups of at least {min_classes} classes"
        )
    logs = np.log(np.maximum(np.asarray(values, dtype=float), 1.0))
    bounds = _natural_breaks(logs, groups, min_classes)
    labels = group_names(groups)
    return [
        ClassGroup(label, names[start:stop], values[start:stop])
        for label, (start, stop) in zip(labels, zip([0, *bounds], [*bounds, len(names)]))
    ]


def _natural_breaks(values: np.ndarray, groups: int, min_size: int) -> list[int]:
    """Cut positions splitting sorted ``values`` into ``groups`` runs of ``>= min_size`` with least total SSE."""
    n = len(values)

    def sse(start: int, stop: int) -> float:
        part = values[start:stop]
        return float(((part - part.mean()) ** 2).sum())

    # best[k][i]: (cost, cuts) of splitting values[:i] into k runs
    best: list[dict[int, tuple[float, list[int]]]] = [{0: (0.0, [])}]
    for k in range(1, groups + 1):
        layer: dict[int, tuple[float, list[int]]] = {}
        for stop in range(k * min_size, n + 1):
            options = [
                (cost + sse(start, stop), cuts + ([start] if start > 0 else []))
                for start, (cost, cuts) in best[k - 1].items()
                if stop - start >= min_size
            ]
            if options:
                layer[stop] = min(options, key=lambda option: option[0])
        best.append(layer)
    return best[groups][n][1]

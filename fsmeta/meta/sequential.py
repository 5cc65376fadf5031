"""The ``sequential`` backend: every source's inner loop in this process, one after another.

It is the reference the Ray backend must match bit for bit, and the backend of
choice for tests and tiny runs where starting actors costs more than it saves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fsmeta.data.crops import CropIndex, gather
from fsmeta.data.sampling import TaskSpec
from fsmeta.data.store import ImageSet
from fsmeta.meta.reptile import AdaptResult, InnerSettings, StateDict, TaskBatch, adapt
from fsmeta.models import build_model


@dataclass
class SourceData:
    """A source data set and the index of its training crops."""

    name: str
    images: ImageSet
    crops: CropIndex

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return gather(self.images, self.crops, rows)


def task_batch(sources: list[SourceData], task: TaskSpec) -> TaskBatch:
    """Pixels of a task: labelled crops of m, unlabelled crops of n and p."""
    x, y = sources[task.m].gather(task.labelled)
    x_n, _ = sources[task.n].gather(task.unlabelled_n)
    x_p, _ = sources[task.p].gather(task.unlabelled_p)
    return TaskBatch.from_numpy(x, y, x_n, x_p)


class SequentialBackend:
    name = "sequential"

    def __init__(self, arch: str, sources: list[SourceData], settings: InnerSettings) -> None:
        self.sources = sources
        self.settings = settings
        self.model = build_model(arch)

    def run(self, theta: StateDict, tasks: list[TaskSpec]) -> list[AdaptResult]:
        return [
            adapt(self.model, theta, task_batch(self.sources, t), self.settings, where=f"source {self.sources[t.m].name}")
            for t in tasks
        ]

    def close(self) -> None:
        pass

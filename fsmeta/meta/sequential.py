"""The ``sequential`` backend: every source's inner loop in this process, one after another.

It is the reference the Ray backend must match bit for bit, and the backend of
choice for tests and tiny runs where starting actors costs more than it saves.
"""

from __future__ import annotations

import torch

from fsmeta.config import ComputeConfig
from fsmeta.data.sampling import TaskSpec
from fsmeta.meta.reptile import AdaptResult, InnerSettings, adapt
from fsmeta.meta.sources import SourceData, task_batch
from fsmeta.models import StateDict, build_model


class SequentialBackend:
    name = "sequential"

    def __init__(self, arch: str, sources: list[SourceData], settings: InnerSettings,
                 compute: ComputeConfig | None = None, threads: int = 0) -> None:
        """``threads``: torch CPU threads of the inner loops (``meta.inner_threads``, as on the
        Ray actors); 0 keeps the process's setting."""
        self.sources = sources
        self.settings = settings
        self.compute = compute
        self.threads = threads
        self.model = build_model(arch)

    def run(self, theta: StateDict, tasks: list[TaskSpec]) -> list[AdaptResult]:
        before = torch.get_num_threads()
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        try:
            return [
                adapt(self.model, theta, task_batch(self.sources, t), self.settings, where=f"source {self.sources[t.m].name}",
                      compute=self.compute)
                for t in tasks
            ]
        finally:
            torch.set_num_threads(before)

    def close(self) -> None:
        pass

"""Ray actors of the execution layer: one :class:`SourceWorker` per source data set.

A worker holds everything its source's inner loop needs and nothing else that
changes: its own crops, opened once from the store, and the unlabelled crop
pools of the other sources, which the driver put into the object store once at
start. Each call builds the task's pixels from a :class:`TaskSpec` exactly as
:func:`fsmeta.meta.sources.task_batch` does and runs
:func:`fsmeta.meta.reptile.adapt` unchanged, so a call is a pure function of
(θ, task): re-running it after a crash or on another node gives the same θ_m.

Storage: the worker opens its source under the configured data root *on the
node it runs on*. On a multi-node cluster the data root must be shared storage
(NFS, a mounted bucket) holding the prepared stores; synthetic domains are
regenerated identically from their seed where they are missing.

θ travels as a dict of numpy arrays (not torch tensors): Ray keeps numpy
arrays in the object store without pickling their buffers, and the
numpy ↔ torch conversion is exact.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import ray
import torch

from fsmeta.compute import autocast_dtype, prepare_model
from fsmeta.config import Config
from fsmeta.data.sampling import TaskSpec
from fsmeta.meta.reptile import InnerSettings, adapt
from fsmeta.meta.sources import SourceData, load_sources, task_batch
from fsmeta.models import StateDict, build_model

NumpyState = dict[str, np.ndarray]


def state_to_numpy(state: StateDict) -> NumpyState:
    """θ as numpy arrays on the CPU, for the object store."""
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def state_from_numpy(arrays: NumpyState) -> StateDict:
    """θ as torch tensors; copies, since arrays from the object store are read-only."""
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}


@dataclass
class WorkerResult:
    """What one call returns: θ_m, the mean inner-loop losses, and seconds spent in ``adapt``."""

    theta: NumpyState
    losses: dict[str, float]
    compute_seconds: float


class SourceWorker:
    """The inner loop of source ``index`` (of ``names``), as a Ray actor.

    Args:
        cfg: the run configuration (data root, crop settings, architecture, inner settings).
        index: which source this worker owns, an index into ``names``.
        names: every source, in the driver's order (task specs index into it).
        pools: object references to the other sources' :class:`SourceData`, keyed by
            source index; resolved once here. They lend unlabelled crops to the
            entropy and distillation terms.
        settings: the inner-loop settings (fresh Adam per call).
        threads: torch CPU threads of the inner loop (``meta.inner_threads``, or the CPUs the actor reserved).
    """

    def __init__(self, cfg: Config, index: int, names: list[str], pools: dict[int, "ray.ObjectRef"],
                 settings: InnerSettings, threads: int) -> None:
        torch.set_num_threads(max(1, int(threads)))
        self.index = index
        self.name = names[index]
        self.settings = settings
        gpu_ids = ray.get_gpu_ids()
        self.device = torch.device("cuda" if gpu_ids and torch.cuda.is_available() else "cpu")
        (own,) = load_sources(cfg, [self.name])
        resolved = dict(zip(pools, ray.get(list(pools.values())))) if pools else {}
        self.sources: list[SourceData | None] = [own if j == index else resolved.get(j) for j in range(len(names))]
        self.compute = cfg.compute
        self.model = prepare_model(build_model(cfg.arch), self.device, self.compute)

    def ready(self) -> dict[str, object]:
        """Where this worker runs; a cheap call that surfaces construction errors."""
        return {"source": self.name, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "device": str(self.device), "threads": torch.get_num_threads(),
                "precision": str(autocast_dtype(self.device, self.compute) or torch.float32).replace("torch.", ""),
                "crops": len(self.sources[self.index].crops)}  # type: ignore[union-attr]

    def run(self, theta: NumpyState, task: TaskSpec) -> WorkerResult:
        """θ_m = adapt(θ, task) for this worker's source; ``task.m`` must be this source."""
        if task.m != self.index:
            raise ValueError(f"worker of source {self.name} (index {self.index}) got the task of source index {task.m}")
        batch = task_batch(self.sources, task)  # type: ignore[arg-type]
        start = time.perf_counter()
        # adapt moves the batch to the model's device (pinned, non-blocking on CUDA).
        result = adapt(self.model, state_from_numpy(theta), batch, self.settings, where=f"source {self.name}",
                       compute=self.compute)
        seconds = time.perf_counter() - start
        return WorkerResult(state_to_numpy(result.theta), result.losses, seconds)

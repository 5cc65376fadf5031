"""The source data sets of meta-training and the pixels of one task, shared by both backends.

:func:`task_batch` turns a :class:`~fsmeta.data.sampling.TaskSpec` (which crops, decided
by the driver from seed, iteration and source) into tensors. The sequential backend
and the Ray actors call it on the same stores, so a task's pixels never depend on
where it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fsmeta.config import Config
from fsmeta.data.crops import CropIndex, build_crop_index, gather
from fsmeta.data.registry import load_dataset, resolve_sources
from fsmeta.data.sampling import TaskSpec
from fsmeta.data.store import ImageSet
from fsmeta.errors import DataError
from fsmeta.meta.reptile import TaskBatch


@dataclass
class SourceData:
    """A source data set and the index of its training crops."""

    name: str
    images: ImageSet
    crops: CropIndex

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return gather(self.images, self.crops, rows)


def load_sources(cfg: Config, names: list[str] | None = None) -> list[SourceData]:
    """Open each source (default: the sources of ``cfg``'s target) and index its crops at the source stride."""
    names = names if names is not None else resolve_sources(cfg)
    out = []
    for name in names:
        images = load_dataset(name, cfg)
        try:
            crops = build_crop_index(images, cfg.data.crop_size, cfg.data.stride(name, "source"), cfg.data.min_foreground)
        except DataError as exc:
            # Every source's crops share one size (a transfer batch mixes sources; distillation compares
            # latents across them), so a source of small images cannot shrink its crop as a target does.
            raise DataError(f"{exc}; as a source of target {cfg.data.target} it needs {cfg.data.crop_size}×"
                            f"{cfg.data.crop_size} windows with {cfg.data.min_foreground} foreground pixels: leave it out "
                            f"of the sources (study.datasets / data.sources) or lower data.crop_size") from None
        out.append(SourceData(name, images, crops))
    return out


def task_batch(sources: list[SourceData], task: TaskSpec) -> TaskBatch:
    """Pixels of a task: labelled crops of m, unlabelled crops of n and p."""
    x, y = sources[task.m].gather(task.labelled)
    x_n, _ = sources[task.n].gather(task.unlabelled_n)
    x_p, _ = sources[task.p].gather(task.unlabelled_p)
    return TaskBatch.from_numpy(x, y, x_n, x_p, key=(task.seed, task.iteration, task.m))

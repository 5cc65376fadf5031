"""Shared fixtures: quiet, offline settings and a tiny configuration on 64×64 crops."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from fsmeta.config import Config, load_config  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Two sources and a target, 96×96 images with four 64×64 crops each: seconds, not minutes.
TINY = [
    "threads=2",
    "data.target=synth-he",
    "data.sources=[synth-fluo, synth-nuclei]",
    "data.crop_size=64",
    "data.min_foreground=10",
    "data.source_stride={default: 32}",
    "data.finetune_stride={default: 32}",
    "data.synth.images=8",
    "data.synth.size=96",
    "meta.iterations=3",
    "meta.inner_steps=2",
    "meta.shots=2",
    "meta.checkpoint_every=1",
    "meta.backend=sequential",  # the Ray backend has its own tests; in-process keeps these fast
    "transfer.steps=3",
    "transfer.batch_size=8",
    "finetune.epochs=2",
    "finetune.steps=0",  # epochs, at data.crop_size: the tiny images hold few crops
    "finetune.crop_size=0",
    "finetune.holdout=0",  # the tiny images hold few crops; tests/unit/test_holdout.py covers the bands
    "augment.finetune=false",
    "eval.shots=[1, 2]",
    "eval.seeds=[0, 1]",
    "tracking.enabled=false",
]


@pytest.fixture
def tiny_config(tmp_path: Path):
    """A factory: tiny_config("meta.variant=bce", ...) → a Config with its own data root."""

    def make(*overrides: str) -> Config:
        return load_config(None, [*TINY, f"data.root={tmp_path / 'data'}", *overrides])

    return make


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs, no dashboard) for every Ray test of the session.

    ``address="local"`` always starts a new instance, never one that a ``ray start``
    on this machine left behind. Tests that need their own cluster shut this one
    down first (``ray.shutdown()``); the next user starts it again.
    """
    import ray

    def start():
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
        return ray

    start()
    yield start
    if ray.is_initialized():
        ray.shutdown()


def brightness_model():
    """A stand-in segmentation model whose foreground is the bright pixels (logit 20·x for x in [−1, 1]):
    known cells, no training, saturated probabilities; predict reads the device off its one parameter."""
    import torch

    class Brightness(torch.nn.Module):
        stride = 8

        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.tensor(20.0))

        def forward(self, x):
            return self.gain * x

    return Brightness()

"""Typed run configuration: dataclasses loaded from YAML, with ``--set key=value`` overrides.

One :class:`Config` travels through the library instead of dozens of loose
arguments. Every field has the paper's value (Dawoud et al. 2020) as its default
unless noted; ``configs/demo.yaml`` reduces the scale for a laptop.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fsmeta.data.catalogue import table
from fsmeta.errors import ConfigError

# The architectures fsmeta.models builds (a test keeps the two equal; the configuration is
# validated without importing torch).
ARCHITECTURES = ("fcrn", "unet")

# Loss variants of §4.3 and the paper's (α, β) for each: α = 0.1 when entropy
# regularisation is the only extra term. "all" is BCE + ER + D; its pre-training
# is called "meta-all" in results tables.
VARIANTS = ("bce", "bce-er", "bce-d", "all")
VARIANT_WEIGHTS = {"bce": (0.0, 0.0), "bce-er": (0.1, 0.0), "bce-d": (0.0, 0.01), "all": (0.01, 0.01)}
_USES_ER = {"bce-er", "all"}
_USES_D = {"bce-d", "all"}


@dataclass
class SynthConfig:
    """The procedural domains used when no real data is prepared."""

    images: int = 40  # images per domain
    size: int = 256  # image side in pixels
    seed: int = 0


@dataclass
class DataConfig:
    root: str = ""  # data root; empty means $FSMETA_DATA or ./data
    target: str = "synth-he"
    sources: list[str] = field(default_factory=list)  # empty: every known data set but the target
    crop_size: int = 256
    # Strides of the training windows per data set (fsmeta.data.catalogue); data sets without an entry take ``default``.
    source_stride: dict[str, int] = field(default_factory=lambda: table("source_stride"))
    finetune_stride: dict[str, int] = field(default_factory=lambda: table("finetune_stride"))
    min_foreground: int = 360  # crops with fewer foreground pixels are dropped
    # The channel a user's colour images become when fsmeta reads folders (finetune --support-images,
    # select on a folder): grey | haematoxylin | auto (fsmeta.data.colour; auto decides from the images).
    # A prepared data set's channel is chosen when it is prepared or imported (--colour) and recorded in its store.
    colour: str = "auto"
    synth: SynthConfig = field(default_factory=SynthConfig)

    def data_root(self) -> Path:
        return Path(self.root or os.environ.get("FSMETA_DATA") or "data")

    def stride(self, dataset: str, phase: str) -> int:
        table = self.source_stride if phase == "source" else self.finetune_stride
        return int(table.get(dataset, table.get("default", 32)))


@dataclass
class MetaConfig:
    """Reptile meta-training (Algorithm 1 of the 2020 paper)."""

    variant: str = "all"
    alpha: float | None = None  # None: the paper's value for the variant
    beta: float | None = None
    entropy: str = "paper"  # "paper": -p log p; "binary": -p log p - (1-p) log(1-p)
    shots: int = 5  # K crops per task
    inner_steps: int = 30
    inner_lr: float = 1e-3
    weight_decay: float = 5e-4
    epsilon: float = 1.0  # meta step size
    iterations: int = 300
    checkpoint_every: int = 25
    backend: str = "ray"  # "ray": one actor per source; "sequential": in-process, one source after another
    # torch CPU threads of every inner loop, on either backend, so the same configuration gives the
    # same θ on both (some CPU kernels sum in another order with another thread count). 0: each Ray
    # actor uses the CPUs it reserves and the sequential backend the process's threads (the backends then differ).
    inner_threads: int = 1

    def loss_weights(self) -> tuple[float, float]:
        """(α, β) in force: explicit values win, else the paper's for the variant; off terms are 0."""
        a0, b0 = VARIANT_WEIGHTS[self.variant]
        alpha = (self.alpha if self.alpha is not None else a0) if self.variant in _USES_ER else 0.0
        beta = (self.beta if self.beta is not None else b0) if self.variant in _USES_D else 0.0
        return float(alpha), float(beta)


@dataclass
class TransferConfig:
    """Transfer-learning baseline: one model on the union of the source crops."""

    steps: int = 3000  # optimiser steps; about the labelled-crop budget of meta-training at K=5
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 5e-4


@dataclass
class AugmentConfig:
    """Seeded augmentation in the training step (fsmeta/augment.py): the eight symmetries of the
    square and a small contrast/brightness jitter. On for fine-tuning by default (measured, docs/results.md);
    off for meta-training and transfer, as the papers train (configs/paper.yaml turns it all off)."""

    meta: bool = False  # the inner loops of meta-training
    transfer: bool = False  # the transfer-learning baseline
    finetune: bool = True  # fine-tuning (benchmark cells, fsmeta finetune, tuning validation); measured +2.4 mIoU on EM K=5
    flips: bool = True
    rot90: bool = True
    contrast: float = 0.1  # c uniform in [1 - contrast, 1 + contrast], x <- c x (normalised [-1, 1] scale)
    brightness: float = 0.1  # b uniform in [-brightness, brightness], x <- x + b


@dataclass
class FinetuneConfig:
    """K-shot fine-tuning. The defaults are the measured ones of docs/results.md (issue 19: a
    budget of 100 steps a shot, at least 500, of 16 crops of 128², Adam 3e-4, with augment.finetune, held-out bands choosing
    the step and the threshold, else the prior threshold); configs/paper.yaml restores the paper's
    20 epochs of batch 64 at data.crop_size, lr 1e-4, no held-out bands."""

    epochs: int = 20  # used when steps is 0
    steps: int = 500  # a step budget instead of epochs (batches drawn across epochs, so cost does not grow with the crops); 0: epochs
    # ... and at least this many steps per shot (support image), so a larger annotation is trained on longer
    # (docs/results.md, issue 19: K=10 at 1000 steps +1.4 to +2.4 over 500 on every target); 0: steps alone
    steps_per_shot: int = 100
    batch_size: int = 16
    crop_size: int = 128  # the side of the fine-tuning crops; 0: data.crop_size (the paper's: one size for meta-training and fine-tuning)
    # the crop grid (data.finetune_stride) also takes the windows flush with each image's right and bottom
    # edges where the stride stops short of them, so every annotated pixel trains (a 360-px image at
    # 128/64 would leave 21 % out; TNBC, EM and ssTEM at 128/64 have no such remainder); false: the paper's plain grid
    cover_edges: bool = True
    lr: float = 3e-4
    # constant: lr at every step; cosine: lr × ½(1 + cos(π t/T)) over the step budget T (Loshchilov & Hutter,
    # SGDR, ICLR 2017, without restarts; nnU-Net and Cellpose also decay the rate to the end of training)
    lr_schedule: str = "constant"
    weight_decay: float = 5e-4
    # Held-out bands (fsmeta.finetune.HeldOut): this share of each support image's height or width
    # is kept out of training to choose the stopping step and the threshold (docs/results.md, issue 19:
    # +4.5 mIoU over 9 cells); 0: off (train on all, eval.threshold_rule decides the threshold).
    # A patch support (select.unit=patch) holds out this share of its patches instead (fsmeta.finetune.hold_out_patches);
    # an image too small to give a band trains whole.
    holdout: float = 0.2
    val_every: int = 50  # steps between validations on the bands
    patience: int = 0  # validations without improvement before stopping; 0: the whole budget
    refit: bool = False  # re-train on every crop for the chosen number of steps (else keep the best weights)

    def budget(self, shots: int) -> int:
        """The step budget of fine-tuning on ``shots`` support images: ``steps``, raised to
        ``steps_per_shot`` × ``shots`` where that is more; 0 (epochs) when ``steps`` is 0."""
        return max(self.steps, self.steps_per_shot * shots) if self.steps > 0 else 0


LR_SCHEDULES = ("constant", "cosine")  # finetune.lr_schedule

# Support-set selection (SPEC §4.6, Dawoud et al. 2023). The per-data-set tables (γ, polarity,
# ψ, patches per shot) come from fsmeta.data.catalogue, where each value's origin is noted.
SELECT_METHODS = ("random", "entropy", "mc-dropout", "consistency", "typiclust", "coverage")


@dataclass
class SelectConfig:
    """Which target images or patches to annotate (``fsmeta select``, the benchmark's selection axis)."""

    # `fsmeta select`'s method: typiclust has the best measured record (docs/results.md, real3-v7:
    # ahead of random in 13 of 15 cells on TNBC, level on EM and ssTEM); configs/paper.yaml keeps the paper's consistency
    method: str = "typiclust"  # random | entropy | mc-dropout | consistency | typiclust | coverage
    unit: str = "patch"  # patch | image: budgets count patches or whole images
    patch_size: int = 256
    patch_stride: int = 0  # 0: the data set's fine-tune stride (the paper's overlapping grid)
    image_score: str = "mean"  # unit=image: "mean" of the image's patch scores, or "whole" (one full-resolution score)
    patches_per_shot: dict[str, int] = field(default_factory=lambda: table("patches_per_shot"))
    pseudo: str = "threshold"  # threshold (equalise, inverse threshold γ, 2×2 dilation) | kmeans (k=2, darker cluster)
    gamma: dict[str, float] = field(default_factory=lambda: table("gamma"))
    auto_gamma: bool = False  # γ per image by Otsu (``--gamma auto``) instead of the table
    polarity: dict[str, str] = field(default_factory=lambda: table("polarity"))
    psi: dict[str, float] = field(default_factory=lambda: table("psi"))
    consistency_target: str = "hard"  # hard: the prediction on the original binarised at 0.5 (authors' code); soft: Eq. 4 as printed
    consistency_weighted: bool = True  # the §4.2 per-patch foreground weight (the authors' code used none)
    # Drop candidate patches whose TRUE mask has fewer foreground pixels (benchmark only). This reads the
    # annotation before selecting; the authors' code did it (360), which hides that consistency favours
    # empty patches. 0: no filter, selection sees pixels only.
    candidate_min_foreground: int = 0
    mc_passes: int = 10
    dropout: float = 0.5  # Dropout2d before the last conv, MC-dropout scoring only
    pretext_epochs: int = 100  # 0: score with the pre-trained model as it is
    pretext_images: str = "all"  # all: every target image (the paper); pool: the selection pool only
    pretext_stride: int = 0  # 0: the data set's fine-tune stride
    min_predicted_foreground: float = 0.0055  # typiclust, coverage: candidates (coverage: and reference patches) θ′ predicts to hold this share of foreground come first (the paper's 0.55 % crop filter)
    pretext_max_steps: int = 0  # at most this many pretext steps (a large target's epochs are cut short); 0: no cap
    pretext_batch_size: int = 64
    pretext_lr: float = 1e-4
    pretext_weight_decay: float = 5e-4
    batch_size: int = 32  # patches per forward pass when scoring

    def __post_init__(self) -> None:
        checks = [
            (self.method in SELECT_METHODS, f"select.method={self.method!r} is not one of {', '.join(SELECT_METHODS)}"),
            (self.unit in ("patch", "image"), f"select.unit={self.unit!r} is not 'patch' or 'image'"),
            (self.image_score in ("mean", "whole"), f"select.image_score={self.image_score!r} is not 'mean' or 'whole'"),
            (self.pseudo in ("threshold", "kmeans"), f"select.pseudo={self.pseudo!r} is not 'threshold' or 'kmeans'"),
            (self.consistency_target in ("hard", "soft"), f"select.consistency_target={self.consistency_target!r} is not 'hard' or 'soft'"),
            (self.pretext_images in ("all", "pool"), f"select.pretext_images={self.pretext_images!r} is not 'all' or 'pool'"),
            (self.patch_size >= 8, f"select.patch_size={self.patch_size} is too small (at least 8)"),
            (self.patch_stride >= 0 and self.pretext_stride >= 0, "select.patch_stride and select.pretext_stride must be >= 0"),
            (self.mc_passes >= 1, f"select.mc_passes={self.mc_passes} must be at least 1"),
            (0.0 <= self.dropout < 1.0, f"select.dropout={self.dropout} must lie in [0, 1)"),
            (self.pretext_epochs >= 0, f"select.pretext_epochs={self.pretext_epochs} must be >= 0"),
            (all(0.0 <= g <= 1.0 for g in self.gamma.values()), f"select.gamma={self.gamma} must lie in [0, 1]"),
            (all(v in ("dark", "bright") for v in self.polarity.values()), f"select.polarity={self.polarity} must be 'dark' or 'bright'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def lookup(self, table: str, dataset: str):
        """A per-data-set value of ``gamma``, ``polarity``, ``psi`` or ``patches_per_shot``.

        Order: the configured entry for ``dataset``, the built-in one (so ``--set
        select.gamma={em: 0.3}`` keeps the other data sets' defaults), the configured
        ``default``, the built-in ``default``.
        """
        values, builtin = getattr(self, table), getattr(SelectConfig(), table)
        for source in (values, builtin):
            if dataset in source:
                return source[dataset]
        return values.get("default", builtin["default"])


@dataclass
class EvalConfig:
    protocol: str = "2020"  # "2020": test on every non-support image; "2023": fixed test split
    shots: list[int] = field(default_factory=lambda: [1, 3, 5, 7, 10])
    seeds: list[int] = field(default_factory=lambda: list(range(10)))
    test_fraction: float = 0.2  # 2023 protocol
    split_seed: int = 0  # 2023 protocol: which fixed split
    vary_split: bool = True  # 2023 protocol: seed s uses split split_seed + s (the paper's 10 splits); false: every seed the same split (draws still differ), e.g. to score a tuned configuration on the test images tuning never read
    threshold: float = 0.5
    # fixed: foreground where p >= eval.threshold; prior: at the threshold that undoes weighted BCE's
    # shift, w / (1 + w) for the support set's foreground weight w (fsmeta.losses.prior_threshold)
    threshold_rule: str = "prior"
    # Predicted objects (8-connected components) smaller than this fraction of the median area of
    # the support set's annotated objects are dropped before scoring, and by `fsmeta predict` on a
    # fine-tuned checkpoint (which records the size): a quarter of the area is half the diameter,
    # CellProfiler's "typical diameter" convention. 0: keep every component (the papers).
    min_size_fraction: float = 0.25
    # Score the mean prediction over the 8 flips and 90° turns (fsmeta.models.tta; 8× the evaluation's
    # forward passes), with the held-out bands' threshold chosen on that mean too (docs/results.md,
    # issue 19: +1.8 mIoU over 12 real3 cells, 10 up). A fine-tuned checkpoint records it, and
    # `fsmeta predict` follows the record (`--no-tta` for the plain, 8× faster prediction).
    tta: bool = True
    # With held-out bands: move their threshold halfway to the one at which eval.pool_images
    # unannotated images of the target (the benchmark: the split's pool minus the support, never a
    # test image; `fsmeta finetune --pool DIR`: a user's folder) are predicted to hold the support's
    # foreground share, unless the two shares disagree by more than 4× (HeldOut.match_pool;
    # docs/results.md, issue 19: on real3 cells it was not designed on, +2.2 mIoU over 9 from a random
    # start and +5.1 over 6 from meta-all θ′; the real3-v7 grid, docs/results.md). Nothing to read
    # without held-out bands, in the 2020 protocol (every image outside the support is a test
    # image) or in `fsmeta finetune` on a user's folders without --pool: the bands' threshold alone.
    pool_threshold: bool = True
    pool_images: int = 8


PRETRAININGS = tuple(f"meta-{v}" for v in VARIANTS) + ("transfer", "scratch")


@dataclass
class StudyConfig:
    """The grid of ``fsmeta benchmark``: targets × architectures × pre-trainings × selections × K × seeds."""

    targets: list[str] = field(default_factory=list)  # empty: data.target alone
    datasets: list[str] = field(default_factory=list)  # the sources of target T are these minus T (all of them for a T not listed); empty: data.sources rule
    archs: list[str] = field(default_factory=lambda: ["fcrn"])
    pretrainings: list[str] = field(default_factory=lambda: ["meta-all", "transfer", "scratch"])
    selections: list[str] = field(default_factory=lambda: ["random"])
    # Pre-trainings that get the selection methods other than random (empty: all of them); the
    # others run random selection alone, e.g. the baselines of the 2023 paper's Table 2.
    selection_pretrainings: list[str] = field(default_factory=list)
    executor: str = "ray"  # "ray": every cell a Ray task; "local": cells one after another in this process
    # With executor=ray: "graph" runs the study as a dependency graph (pre-trainings in parallel, each
    # cell as soon as its model exists; fsmeta.graph); "sequential" pre-trains one model after another
    # in the driver, then runs the cells.
    scheduler: str = "graph"
    max_gpus: float = 0.0  # graph scheduler: at most this many GPUs in use by the study at once; 0: the whole cluster
    max_cpus: float = 0.0  # graph scheduler: at most this many CPUs in use by the study at once; 0: the whole cluster
    cell_cpus: float = 1.0  # CPUs per cell task (torch threads in the task)
    cell_gpus: float = 0.0  # GPUs per cell task; fractions pack several cells on one GPU
    overlays: int = 3  # test images per target drawn as overlays (TP white, FP red, FN green, TN black)


@dataclass
class TrackingConfig:
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "fsmeta"
    enabled: bool = True


@dataclass
class RayConfig:
    """Where and how the Ray execution layer runs (meta.backend=ray)."""

    address: str = ""  # empty: $RAY_ADDRESS, else a new local instance started by ray.init()
    gpus_per_worker: float = -1.0  # GPUs per source actor; -1: one each when GPUs ≥ sources, else an even share (fsmeta.meta.resources.worker_gpus); 0 without GPUs
    cpus_per_worker: float = 0.0  # CPUs reserved per source actor (torch threads: this, rounded down, at least 1); 0: min(1, cluster CPUs / sources)
    num_cpus: int = 0  # CPUs of a local instance; 0: all of this machine's, or enough for every source actor if more
    include_dashboard: bool = False  # a local instance's dashboard, bound to 127.0.0.1 when on
    placement_strategy: str = "PACK"  # placement group of the source actors: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD
    placement_timeout_s: float = 300.0  # give up (with the cluster's free resources in the message) after this long
    max_restarts: int = -1  # restarts of a crashed source actor; -1: unlimited
    max_task_retries: int = -1  # re-runs of a call lost with its actor or node; -1: unlimited (outlasts node-loss detection)
    recreate_attempts: int = 3  # if an actor is dead for good, the driver re-creates it and re-runs its task this often


@dataclass
class TuningConfig:
    """``fsmeta tune``: a Ray Tune study over configuration keys (the space lives in tune_spaces/*.yaml).

    The objective is the mean fine-tuned mIoU over ``shots`` × ``seeds`` on a validation
    split carved from the target's pool; the 2023 protocol's test split (eval.test_fraction,
    eval.split_seed) is never read."""

    trials: int = 16  # Tune samples
    search: str = "random"  # random | optuna
    scheduler: str = "asha"  # asha (stops weak trials at each evaluation) | fifo (every trial runs to the end)
    shots: list[int] = field(default_factory=lambda: [1, 5])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    val_fraction: float = 0.25  # of the pool: the validation images; support sets come from the rest
    eval_every: int = 0  # meta-iterations between validation reports; 0: meta.iterations / 5
    reduction_factor: int = 3  # ASHA: keep the best 1/3 at each rung
    trial_cpus: float = 1.0  # the trial's own bundle (fine-tuning and validation); source actors get their own
    trial_gpus: float = 0.0
    max_concurrent: int = 0  # 0: as many trials as the cluster's resources hold
    include_defaults: bool = True  # the first trial runs the base configuration's values (the paper's defaults)


@dataclass
class ComputeConfig:
    """How training and inference use the device (fsmeta/compute.py); never what they compute.

    ``auto`` follows the hardware: bf16 autocast and channels_last on CUDA and on a CPU with
    native bf16 (AVX-512 BF16 or AMX); fp32 with channels_last on another x86-64 CPU; fp32 and
    the default memory format elsewhere. ``amp=off, channels_last=off`` is the exact fp32 path.
    """

    amp: str = "auto"  # auto: bf16 autocast where bf16 is native (CUDA; CPUs with AVX-512 BF16 or AMX), else fp32; bf16: autocast on any device; off: fp32 everywhere
    channels_last: str = "auto"  # auto: on where bf16 is native, as amp, and on any x86-64 CPU (faster fp32 convolutions); on | off
    cudnn_benchmark: bool = True  # let cuDNN pick the fastest convolution per input shape (CUDA only)
    compile: bool = False  # torch.compile the model's forward (pays a compile per process; for long runs)

    def __post_init__(self) -> None:
        # YAML reads a bare on/off (yes/no, true/false) as a boolean; take it as the switch it names.
        switch = {"false": "off", "true": "on"}
        self.amp = switch.get(str(self.amp).lower(), str(self.amp))
        self.channels_last = switch.get(str(self.channels_last).lower(), str(self.channels_last))
        if self.amp not in ("auto", "bf16", "off"):
            raise ConfigError(f"compute.amp={self.amp!r} is not 'auto', 'bf16' or 'off'")
        if self.channels_last not in ("auto", "on", "off"):
            raise ConfigError(f"compute.channels_last={self.channels_last!r} is not 'auto', 'on' or 'off'")


@dataclass
class Config:
    seed: int = 0
    arch: str = "fcrn"
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    data: DataConfig = field(default_factory=DataConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    tune: TuningConfig = field(default_factory=TuningConfig)

    def finetune_crop_size(self) -> int:
        """The side of the fine-tuning crops: ``finetune.crop_size``, or ``data.crop_size`` when it is 0."""
        return int(self.finetune.crop_size or self.data.crop_size)

    def finetune_min_foreground(self) -> int:
        """The foreground pixels a fine-tuning crop needs to be kept: ``data.min_foreground`` (stated for
        ``data.crop_size`` crops) scaled by the crops' area ratio, so the same share of the crop
        (the paper's 360 of 256², 0.55 %) holds at every fine-tuning crop size."""
        ratio = self.finetune_crop_size() / self.data.crop_size
        return int(round(self.data.min_foreground * ratio * ratio))

    def finetune_grid(self, dataset: str) -> dict[str, Any]:
        """How ``dataset``'s support images are cut into fine-tuning crops: the keyword arguments
        ``crop_size``, ``stride``, ``min_foreground`` and ``cover`` of :func:`fsmeta.data.io.support_crop_index`."""
        return {"crop_size": self.finetune_crop_size(), "stride": self.data.stride(dataset, "finetune"),
                "min_foreground": self.finetune_min_foreground(), "cover": self.finetune.cover_edges}

    def validate(self) -> "Config":
        check_ranges(self)
        checks = [
            (self.arch in ARCHITECTURES, f"arch={self.arch!r} is not one of {', '.join(ARCHITECTURES)}"),
            (self.meta.variant in VARIANTS, f"meta.variant={self.meta.variant!r} is not one of {', '.join(VARIANTS)}"),
            (self.meta.entropy in ("paper", "binary"), f"meta.entropy={self.meta.entropy!r} is not 'paper' or 'binary'"),
            (self.meta.backend in ("sequential", "ray"), f"meta.backend={self.meta.backend!r} is not 'sequential' or 'ray'"),
            (self.data.colour in ("auto", "grey", "haematoxylin"),
             f"data.colour={self.data.colour!r} is not 'auto', 'grey' or 'haematoxylin'"),
            (self.finetune.lr_schedule in LR_SCHEDULES,
             f"finetune.lr_schedule={self.finetune.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}"),
            (self.eval.protocol in ("2020", "2023"), f"eval.protocol={self.eval.protocol!r} is not '2020' or '2023'"),
            (self.eval.threshold_rule in ("fixed", "prior"), f"eval.threshold_rule={self.eval.threshold_rule!r} is not 'fixed' or 'prior'"),
            (0.0 < self.eval.test_fraction < 1.0, f"eval.test_fraction={self.eval.test_fraction} must lie in (0, 1)"),
            (self.data.crop_size >= 8, f"data.crop_size={self.data.crop_size} is too small (at least 8)"),
            (self.finetune.crop_size == 0 or self.finetune.crop_size >= 8,
             f"finetune.crop_size={self.finetune.crop_size} is too small (at least 8; 0: data.crop_size)"),
            (self.meta.shots >= 1, f"meta.shots={self.meta.shots} must be at least 1"),
            (self.meta.inner_steps >= 1, f"meta.inner_steps={self.meta.inner_steps} must be at least 1"),
            (self.meta.iterations >= 1, f"meta.iterations={self.meta.iterations} must be at least 1"),
            (self.meta.checkpoint_every >= 1, f"meta.checkpoint_every={self.meta.checkpoint_every} must be at least 1"),
            (all(k >= 1 for k in self.eval.shots), f"eval.shots={self.eval.shots} must all be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        st = self.study
        for label, values, allowed in (("study.archs", st.archs, ARCHITECTURES), ("study.pretrainings", st.pretrainings, PRETRAININGS)):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ConfigError(f"{label}={values} must name one or more of {', '.join(allowed)}")
        bad = [v for v in st.selections if v not in SELECT_METHODS]
        if bad or not st.selections:
            raise ConfigError(f"study.selections={st.selections} must name one or more of {', '.join(SELECT_METHODS)}")
        stray = [p for p in st.selection_pretrainings if p not in st.pretrainings]
        if stray:
            raise ConfigError(f"study.selection_pretrainings={st.selection_pretrainings} names {stray}, not in study.pretrainings={st.pretrainings}")
        if st.executor not in ("ray", "local"):
            raise ConfigError(f"study.executor={st.executor!r} is not 'ray' or 'local'")
        if st.scheduler not in ("graph", "sequential"):
            raise ConfigError(f"study.scheduler={st.scheduler!r} is not 'graph' or 'sequential'")
        if st.max_gpus < 0 or st.max_cpus < 0:
            raise ConfigError(f"study.max_gpus={st.max_gpus} and study.max_cpus={st.max_cpus} must be >= 0 (0: no cap)")
        if st.cell_cpus <= 0 or st.cell_gpus < 0:
            raise ConfigError(f"study.cell_cpus={st.cell_cpus} must be > 0 and study.cell_gpus={st.cell_gpus} >= 0")
        tu = self.tune
        tune_checks = [
            (tu.trials >= 1, f"tune.trials={tu.trials} must be at least 1"),
            (tu.search in ("random", "optuna"), f"tune.search={tu.search!r} is not 'random' or 'optuna'"),
            (tu.scheduler in ("asha", "fifo"), f"tune.scheduler={tu.scheduler!r} is not 'asha' or 'fifo'"),
            (bool(tu.shots) and all(k >= 1 for k in tu.shots), f"tune.shots={tu.shots} must be one or more K >= 1"),
            (bool(tu.seeds), "tune.seeds must name at least one seed"),
            (0.0 < tu.val_fraction < 1.0, f"tune.val_fraction={tu.val_fraction} must lie in (0, 1)"),
            (tu.eval_every >= 0, f"tune.eval_every={tu.eval_every} must be >= 0"),
            (tu.reduction_factor >= 2, f"tune.reduction_factor={tu.reduction_factor} must be at least 2"),
            (tu.trial_cpus > 0 and tu.trial_gpus >= 0, f"tune.trial_cpus={tu.trial_cpus} must be > 0 and tune.trial_gpus={tu.trial_gpus} >= 0"),
        ]
        for ok, message in tune_checks:
            if not ok:
                raise ConfigError(message)
        for name in ("alpha", "beta"):
            value = getattr(self.meta, name)
            if value is not None and not (value >= 0.0):
                raise ConfigError(f"meta.{name}={value} must be a non-negative number")
        if self.data.target in self.data.sources:
            raise ConfigError(
                f"target {self.data.target!r} is also listed as a source; leave-one-data-set-out "
                "needs the target excluded from data.sources"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys → values, for MLflow params."""
        return flatten(self.to_dict())


# Allowed ranges of the numeric settings: (low, low inclusive, high, high inclusive); None is unbounded.
# A key ending in ".*" applies to every value of that table. Learning rates must be positive: 0 learns
# nothing and a negative rate climbs the loss; too large a rate diverges, and diverged weights are
# refused when they are saved (fsmeta.checkpoint.validate_state).
_POSITIVE = (0.0, False, None, False)
_NON_NEGATIVE = (0.0, True, None, False)
_AT_LEAST_1 = (1, True, None, False)
_UNIT_OPEN = (0.0, False, 1.0, False)
RANGES: dict[str, tuple[Any, bool, Any, bool]] = {
    "threads": _NON_NEGATIVE,
    "data.min_foreground": _NON_NEGATIVE,
    "data.source_stride.*": _AT_LEAST_1,
    "data.finetune_stride.*": _AT_LEAST_1,
    "data.synth.images": _AT_LEAST_1,
    "data.synth.size": (8, True, None, False),
    "meta.inner_lr": _POSITIVE,
    "meta.weight_decay": _NON_NEGATIVE,
    "meta.epsilon": _POSITIVE,
    "meta.inner_threads": _NON_NEGATIVE,
    "augment.contrast": (0.0, True, 1.0, False),
    "augment.brightness": _NON_NEGATIVE,
    "transfer.steps": _AT_LEAST_1,
    "transfer.batch_size": _AT_LEAST_1,
    "transfer.lr": _POSITIVE,
    "transfer.weight_decay": _NON_NEGATIVE,
    "finetune.epochs": _AT_LEAST_1,
    "finetune.steps": _NON_NEGATIVE,
    "finetune.steps_per_shot": _NON_NEGATIVE,
    "finetune.batch_size": _AT_LEAST_1,
    "finetune.crop_size": _NON_NEGATIVE,
    "finetune.lr": _POSITIVE,
    "finetune.weight_decay": _NON_NEGATIVE,
    "finetune.holdout": (0.0, True, 0.5, False),
    "finetune.val_every": _AT_LEAST_1,
    "finetune.patience": _NON_NEGATIVE,
    "select.patches_per_shot.*": _AT_LEAST_1,
    "select.psi.*": _POSITIVE,
    "select.candidate_min_foreground": _NON_NEGATIVE,
    "select.pretext_batch_size": _AT_LEAST_1,
    "select.pretext_max_steps": _NON_NEGATIVE,
    "select.min_predicted_foreground": (0.0, True, 1.0, False),
    "select.pretext_lr": _POSITIVE,
    "select.pretext_weight_decay": _NON_NEGATIVE,
    "select.batch_size": _AT_LEAST_1,
    "eval.threshold": _UNIT_OPEN,
    "eval.min_size_fraction": (0.0, True, 1.0, True),
    "eval.pool_images": _AT_LEAST_1,
    "ray.cpus_per_worker": _NON_NEGATIVE,
    "ray.num_cpus": _NON_NEGATIVE,
    "ray.placement_timeout_s": _POSITIVE,
    "ray.recreate_attempts": _NON_NEGATIVE,
    "study.overlays": _NON_NEGATIVE,
}


def _describe(rng: tuple[Any, bool, Any, bool]) -> str:
    lo, lo_in, hi, hi_in = rng
    if hi is None:
        return f"{'at least' if lo_in else 'greater than'} {lo}"
    return f"in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


def check_ranges(cfg: "Config") -> None:
    """Every number of ``cfg`` finite, and each key of :data:`RANGES` in its range; else a
    :class:`ConfigError` naming the key, its value and the allowed range."""
    flat = flatten(dataclasses.asdict(cfg))
    for key, value in flat.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key}={value} must be a finite number")
    for pattern, rng in RANGES.items():
        keys = [k for k in flat if k.startswith(pattern[:-1])] if pattern.endswith(".*") else [pattern]
        for key in keys:
            value = flat.get(key)
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            lo, lo_in, hi, hi_in = rng
            ok = (value >= lo if lo_in else value > lo) and (hi is None or (value <= hi if hi_in else value < hi))
            if not ok:
                raise ConfigError(f"{key}={value} is out of range: it must be {_describe(rng)}")


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"meta": {"alpha": 0.1}}`` → ``{"meta.alpha": 0.1}``."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


# Settings that change where or how fast a run computes, never what it computes
# (the compute path is bit-identical on the CPU and within bf16 noise on CUDA):
# changing them never blocks a resume.
RUNTIME_KEYS = ("ray.", "tracking.", "threads", "compute.", "meta.backend", "study.executor", "study.cell_cpus", "study.cell_gpus",
                "study.scheduler", "study.max_gpus", "study.max_cpus")
# Defaults of `fsmeta select` alone (a benchmark's methods are study.selections, a Tune trial selects
# nothing): a benchmark or a Tune study never reads them, so a change never blocks their resume.
SELECT_COMMAND_KEYS = ("select.method",)


def field_path(key: str) -> str:
    """The dataclass field of a flat key: ``select.patches_per_shot.b5`` → ``select.patches_per_shot``."""
    node: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        node = hints.get(part)
        if not dataclasses.is_dataclass(node):
            return ".".join(parts[: i + 1])
    return key


def _under(key: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(key == p or key.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


# What a run saved before a field existed did, where the field's default has changed since it was
# added: a saved configuration without the field is compared as if it held this value (else as the
# current default), so resuming an older run under flipped defaults is refused, not silently mixed.
ABSENT_MEANS: dict[str, Any] = {
    "finetune.steps": 0,  # epochs (issue 19 made 500 steps the default)
    "finetune.steps_per_shot": 0,  # finetune.steps whatever the shots
    "finetune.crop_size": 0,  # data.crop_size
    "finetune.holdout": 0.0,  # every pixel trains
    "finetune.cover_edges": False,  # the plain stride grid
    "augment.meta": False,
    "augment.transfer": False,
    "augment.finetune": False,
    "eval.threshold_rule": "fixed",
    "eval.min_size_fraction": 0.0,  # every predicted component scored
    "eval.tta": False,  # the plain prediction scored
    "eval.pool_threshold": False,  # the held-out bands' threshold alone
}


# The per-data-set tables: an entry of a data set that nothing of a run reads (neither a target nor a source)
# changes nothing, so a configuration may gain one (e.g. real3.yaml's b5 and b39 strides) and the run still resumes.
DATASET_TABLES = ("data.source_stride", "data.finetune_stride", "select.gamma", "select.polarity", "select.psi",
                  "select.patches_per_shot")


def read_datasets(cfg: "Config") -> set[str] | None:
    """The data sets a run reads, its targets and sources (:func:`fsmeta.study.target_config`); None when
    the sources are every known data set (neither ``study.datasets`` nor ``data.sources`` set)."""
    sources = cfg.study.datasets or cfg.data.sources
    return set(cfg.study.targets or [cfg.data.target]) | set(sources) if sources else None


# The per-data-set tables read through SelectConfig.lookup, which falls back to the built-in entry of a data
# set the configured table lacks: ``--set select.gamma={em: 0.3}`` keeps every other data set's built-in γ.
LOOKUP_TABLES = tuple(t for t in DATASET_TABLES if t.startswith("select."))


def changed_keys(saved: dict[str, Any], now: dict[str, Any], *, ignore: tuple[str, ...] | list[str] = RUNTIME_KEYS,
                 only: tuple[str, ...] | list[str] | None = None, datasets: set[str] | None = None) -> list[str]:
    """Flat keys whose values differ between a run's saved configuration and ``now`` (both ``Config.flat()``).

    The one test behind every ``--resume`` (benchmark, tune study, meta-training):
    a field the saved configuration lacks was added to fsmeta after the run
    started, and counts as its default (or as :data:`ABSENT_MEANS` says, where the default
    changed after the field was added); keys under ``ignore`` are skipped; with
    ``only``, just keys under those prefixes are compared. A dict field the saved
    configuration has is compared as saved (its missing entries are not refilled), but for the select
    tables (:data:`LOOKUP_TABLES`) a missing entry is the built-in one, which the run reads in its place. With
    ``datasets`` (:func:`read_datasets`), entries of :data:`DATASET_TABLES` for other data sets
    (not ``default``) are not compared.
    """
    defaults = Config().flat()
    saved_fields = {field_path(k) for k in saved}
    added = {k: ABSENT_MEANS.get(k, v) for k, v in defaults.items() if field_path(k) not in saved_fields}
    # a lookup table's missing entry, on either side, is the built-in one the run reads in its place
    builtin = {k: v for k, v in defaults.items() if field_path(k) in LOOKUP_TABLES}
    before = {**builtin, **added, **saved}
    now = {**builtin, **now}

    def keep(k: str) -> bool:
        table = field_path(k)
        if datasets is not None and table in DATASET_TABLES and k[len(table) + 1:] not in datasets | {"default"}:
            return False
        return not _under(k, ignore) and (only is None or _under(k, only))

    return sorted(k for k in set(before) | set(now) if keep(k) and before.get(k) != now.get(k))


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Check and convert a YAML value to the annotated field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {_convert(kt, k, where): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, str):
            # PyYAML reads 1e-3 (no dot) as a string; accept what a person would call a number.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        if tp is int and float(value) != int(value):
            raise ConfigError(f"{where} must be a whole number, got {value!r}")
        return tp(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, values: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown configuration key {prefix}{unknown[0]}; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``meta.alpha=0.1`` → ``{"meta": {"alpha": 0.1}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    value: Any = yaml.safe_load(raw) if raw.strip() else ""
    for part in reversed(parts):
        value = {part: value}
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (if any), then each ``key=value`` override, validated."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"configuration file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold a mapping of configuration keys")
        values = loaded
    for text in overrides:
        values = _merge(values, parse_override(text))
    # Strides merge into the defaults instead of replacing the whole table.
    data = values.get("data")
    if isinstance(data, dict):
        for key, defaults in (("source_stride", DataConfig().source_stride), ("finetune_stride", DataConfig().finetune_stride)):
            if isinstance(data.get(key), dict):
                data[key] = {**defaults, **data[key]}
    cfg = _build(Config, values).validate()
    check_budget_keys(values, cfg)
    return cfg


def check_budget_keys(given: dict[str, Any], cfg: Config) -> None:
    """Refuse a fine-tuning budget key that another would silently override: with
    ``finetune.steps`` > 0 the budget is that many steps and ``finetune.epochs`` is not read;
    with ``finetune.steps`` = 0 it is epochs and ``finetune.steps_per_shot`` is not read. A file
    or ``--set`` that changes the unread key asked for something that would not happen. (Their
    defaults, which every written-out configuration holds, pass.)"""
    section = given.get("finetune")
    if not isinstance(section, dict):
        return
    if "epochs" in section and cfg.finetune.steps > 0 and cfg.finetune.epochs != FinetuneConfig.epochs:
        raise ConfigError(f"finetune.epochs={cfg.finetune.epochs} has no effect: finetune.steps={cfg.finetune.steps} sets the "
                          "fine-tuning budget (steps of finetune.batch_size crops); set finetune.steps=0 to fine-tune by epochs")
    if "steps_per_shot" in section and cfg.finetune.steps == 0 and cfg.finetune.steps_per_shot != FinetuneConfig.steps_per_shot:
        raise ConfigError(f"finetune.steps_per_shot={cfg.finetune.steps_per_shot} has no effect: finetune.steps=0 fine-tunes for "
                          f"finetune.epochs={cfg.finetune.epochs} epochs; set finetune.steps > 0 for a step budget")


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a configuration from :meth:`Config.to_dict` output (e.g. inside a Ray task)."""
    return _build(Config, values).validate()


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

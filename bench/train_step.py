"""Training-step throughput (crops/s) of fsmeta's shared training step, FCRN and U-Net.

Each measurement is one epoch of ``fsmeta.finetune.finetune`` (the step that
meta-training, transfer and pretext training share: ``fsmeta.step.TrainingStep``)
over ``--batch`` × ``--steps`` random crops, after one untimed warm-up step; the
modes run interleaved, ``--rounds`` times, and the best round counts.

On a CPU (``--threads``, default 1 and 2; ``--sizes``, default 128 and 256): a plain
fp32 loop (fsmeta's loop before ``fsmeta.compute``), fsmeta in exact fp32
(``compute.amp=off``, ``channels_last=off``), fp32 + channels_last, bf16 autocast
alone, and fsmeta's defaults (``auto``: bf16 autocast + channels_last where the CPU
has native bf16, AVX-512 BF16 or AMX; fp32 elsewhere). Prints defaults / fp32
(target ≥ 2.5× on a CPU with native bf16), fp32 / plain (≥ 0.95) and 2 threads / 1 thread;
``--compile`` adds the defaults with ``compute.compile`` (its warm-up untimed).

On CUDA: the plain fp32 loop (pageable memory, a host sync per step, cuDNN
autotuning off), fsmeta in fp32 (``compute.amp=off``, ``channels_last=off``) and
fsmeta's defaults (bf16 autocast + channels_last); ``--compile`` adds the defaults
with ``compute.compile``. Prints bf16+channels_last / fp32 (target ≥ 2×) and
fsmeta / plain. "fp32" is what torch runs by default: cuDNN may use TF32 tensor
cores for its convolutions (printed; ``--no-tf32`` for strict fp32).

    python bench/train_step.py                                   # this machine's device
    python bench/train_step.py --device cpu --batch 8 --steps 4 --threads 2 --sizes 128 256
    python bench/train_step.py --sizes 64 --batch 4 --steps 2 --rounds 1   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fsmeta.compute import autocast_dtype, channels_last, cpu_has_native_bf16, default_device  # noqa: E402
from fsmeta.config import ComputeConfig, FinetuneConfig  # noqa: E402
from fsmeta.finetune import finetune  # noqa: E402
from fsmeta.losses import weighted_bce  # noqa: E402
from fsmeta.models import build_model, make_bn_affine  # noqa: E402


def machine_line(device: torch.device) -> str:
    """The machine a figure was measured on: CPU, cores, load, GPU, library versions."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    gpu = "no GPU"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{torch.cuda.device_count()}× {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return (f"machine: {platform.processor() or platform.machine()}, {cores} cores, load avg {load}; {gpu}; "
            f"device {device}; torch {torch.__version__}, Python {platform.python_version()}")


def random_crops(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops in [-1, 1] and masks with ~10 % foreground; speed does not depend on their content."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 1, size, size)).astype(np.float32)
    y = (rng.random((n, 1, size, size)) < 0.1).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


def plain_fp32_epoch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig, seed: int = 0) -> list[float]:
    """fsmeta's fine-tuning loop before fsmeta.compute, verbatim: fp32, pageable batches, a loss read per step."""
    make_bn_affine(model)
    model.train()
    device = next(model.parameters()).device
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []
    for epoch in range(cfg.epochs):
        order = torch.from_numpy(np.random.default_rng([seed, 31337, epoch]).permutation(len(x)))
        total, batches = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            optimiser.zero_grad(set_to_none=True)
            xb, yb = x[rows].to(device, non_blocking=True), y[rows].to(device, non_blocking=True)
            loss = weighted_bce(model(xb), yb)
            value = float(loss.detach())
            if not np.isfinite(value):
                raise RuntimeError(f"loss is {value} in epoch {epoch}")
            loss.backward()
            optimiser.step()
            total += value
            batches += 1
        history.append(total / batches)
    return history


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def modes(device: torch.device, compile_too: bool) -> dict[str, Callable]:
    """Mode name → run(model, x, y, cfg): one epoch on ``device``."""

    def plain(model, x, y, cfg):
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False  # as before fsmeta.compute switched it on
        try:
            return plain_fp32_epoch(model, x, y, cfg)
        finally:
            torch.backends.cudnn.benchmark = benchmark

    def fsmeta_with(compute: ComputeConfig):
        return lambda model, x, y, cfg: finetune(model, x, y, cfg, seed=0, compute=compute)[1]

    if device.type == "cpu":
        out = {"plain fp32": plain, "fsmeta fp32": fsmeta_with(ComputeConfig(amp="off", channels_last="off")),
               "fp32+CL": fsmeta_with(ComputeConfig(amp="off", channels_last="on")),
               "bf16": fsmeta_with(ComputeConfig(amp="bf16", channels_last="off")),
               "fsmeta default": fsmeta_with(ComputeConfig())}
        if not cpu_has_native_bf16():  # emulated bf16: ~17× slower than fp32 (a 2-core AVX2 EPYC), nothing to learn
            del out["bf16"]
        if compile_too:
            out["fsmeta default+compile"] = fsmeta_with(ComputeConfig(compile=True))
        return out
    out = {"plain fp32": plain, "fsmeta fp32": fsmeta_with(ComputeConfig(amp="off", channels_last="off")),
           "fsmeta bf16+CL": fsmeta_with(ComputeConfig())}
    if compile_too:
        out["fsmeta bf16+CL+compile"] = fsmeta_with(ComputeConfig(compile=True))
    return out


def throughput(arch: str, device: torch.device, size: int, batch: int, steps: int, rounds: int,
               runs: dict[str, Callable]) -> dict[str, list[float]]:
    """crops/s of every mode in every round (modes interleaved within a round)."""
    torch.manual_seed(0)
    base = build_model(arch)
    x, y = random_crops(batch * steps, size)
    cfg = FinetuneConfig(epochs=1, steps=0, batch_size=batch, holdout=0)  # one epoch, as the paper fine-tunes (not the 500-step default)
    out: dict[str, list[float]] = {name: [] for name in runs}
    for name, run in runs.items():  # warm-up: allocator, cuDNN autotuning, compilation
        run(copy.deepcopy(base).to(device), x[:batch], y[:batch], cfg)
    for _ in range(rounds):
        for name, run in runs.items():
            model = copy.deepcopy(base).to(device)
            _sync(device)
            start = time.perf_counter()
            run(model, x, y, cfg)
            _sync(device)
            out[name].append(len(x) / (time.perf_counter() - start))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["fcrn", "unet"], help="architectures (default: fcrn unet)")
    p.add_argument("--sizes", type=int, nargs="+", default=[], help="crop sides in pixels (default: 256 on CUDA, 128 256 on a CPU)")
    p.add_argument("--batch", type=int, default=0, help="crops per step (default: 64 on CUDA, 8 on a CPU)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per round (default: 20 on CUDA, 4 on a CPU)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best counts (default: 3)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU: torch thread counts (default: 1 2)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: CUDA when present")
    p.add_argument("--compile", action="store_true", help="also time compute.compile on top of the defaults (default: off)")
    p.add_argument("--no-tf32", action="store_true", help="CUDA: strict fp32 convolutions (default: torch's TF32 setting)")
    args = p.parse_args(argv)

    device = default_device() if args.device == "auto" else torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (64 if cuda else 8)
    steps = args.steps or (20 if cuda else 4)
    if cuda and args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    sizes = args.sizes or ([256] if cuda else [128, 256])
    print(machine_line(device))
    if not cuda:
        default = ComputeConfig()
        print(f"CPU native bf16 (AVX-512 BF16 or AMX): {cpu_has_native_bf16()}; fsmeta default = "
              f"{'bf16 autocast' if autocast_dtype(device, default) else 'fp32'}"
              f"{' + channels_last' if channels_last(device, default) else ''}")
    print(f"batch {batch}, {steps} timed steps × {args.rounds} rounds (best), Adam, weighted BCE"
          + (f"; cuDNN TF32 {'on' if torch.backends.cudnn.allow_tf32 else 'off'}" if cuda else ""))
    runs = modes(device, args.compile)
    threads = args.threads if not cuda else [torch.get_num_threads()]
    print(f"\n{'arch':<5} {'size':>5} {'threads':>7} {'mode':<24} {'crops/s':>9} {'median':>9}")
    summary = []
    for arch in args.archs:
        for size in sizes:
            best_by_threads = {}
            for t in threads:
                torch.set_num_threads(t)
                rates = throughput(arch, device, size, batch, steps, args.rounds, runs)
                best = {name: max(r) for name, r in rates.items()}
                best_by_threads[t] = best
                for name, r in rates.items():
                    print(f"{arch:<5} {size:>5} {t:>7} {name:<24} {max(r):>9.2f} {statistics.median(r):>9.2f}", flush=True)
                if cuda:
                    summary.append(f"{arch} {size}²: bf16+channels_last / fp32 = {best['fsmeta bf16+CL'] / best['fsmeta fp32']:.2f}× (target ≥ 2×); "
                                   f"fsmeta defaults / plain fp32 loop = {best['fsmeta bf16+CL'] / best['plain fp32']:.2f}×")
                    if "fsmeta bf16+CL+compile" in best:
                        summary.append(f"{arch} {size}²: + compile / bf16+channels_last = {best['fsmeta bf16+CL+compile'] / best['fsmeta bf16+CL']:.2f}×")
                else:
                    bf16 = f"bf16 alone {best['bf16'] / best['fsmeta fp32']:.2f}×, " if "bf16" in best else "bf16 emulated (not run), "
                    summary.append(f"{arch} {size}², {t} thread(s): fsmeta default / fp32 = {best['fsmeta default'] / best['fsmeta fp32']:.2f}× "
                                   f"(target ≥ 2.5× with native bf16); {bf16}fp32+CL "
                                   f"{best['fp32+CL'] / best['fsmeta fp32']:.2f}×; fsmeta fp32 / plain fp32 loop = "
                                   f"{best['fsmeta fp32'] / best['plain fp32']:.3f} (target ≥ 0.95)")
                    if "fsmeta default+compile" in best:
                        summary.append(f"{arch} {size}², {t} thread(s): + compile / fsmeta default = "
                                       f"{best['fsmeta default+compile'] / best['fsmeta default']:.2f}×")
            if not cuda and 1 in best_by_threads and 2 in best_by_threads:
                summary.append(f"{arch} {size}²: 2 threads / 1 thread (fsmeta default) = "
                               f"{best_by_threads[2]['fsmeta default'] / best_by_threads[1]['fsmeta default']:.2f}×")
    print("\nratios (this run):")
    for line in summary:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the source actors of one meta-training reserve, computed in one place for the
Ray backend (its own placement group) and for Ray Tune trials (bundles of the trial's
placement group). Plain arithmetic: no ray import.

Layout of a trial's placement group (:func:`fsmeta.tuning.resources.trial_resources`):
bundle 0 is the trial itself, the last ``sources`` bundles are its source actors,
in source order (:func:`actor_bundle_offset`).
"""

from __future__ import annotations

import math

from fsmeta.config import RayConfig

def round_down(share: float) -> float:
    """``share`` rounded down to Ray's resolution of 1e-4, so n shares of 1/n never add up to more than one."""
    return math.floor(share * 1e4) / 1e4


def worker_gpus(configured: float, cluster_gpus: float, sources: int) -> float:
    """GPUs each source actor reserves: ``configured`` when it is ≥ 0, else the automatic share.

    Automatic (-1): 0 without GPUs; one GPU per actor when there are at least as
    many GPUs as sources; else the actors share the GPUs evenly, 1 / ceil(sources / GPUs)
    of one each. That is min(1, GPUs / sources) whenever the GPUs divide the sources, and
    a little less otherwise, because Ray places a fractional share on a single GPU: with
    3 GPUs and 4 sources, 0.75 each would leave the fourth actor no GPU with 0.75 free,
    while 0.5 each puts two actors on each of two GPUs. Shares are rounded down to Ray's
    resolution of 1e-4, so n shares of 1/n never add up to more than one GPU.
    """
    if configured >= 0:
        return float(configured)
    whole = int(math.floor(cluster_gpus + 1e-9))
    if whole < 1 or sources < 1:
        return 0.0
    if whole >= sources:
        return 1.0
    return round_down(1 / math.ceil(sources / whole))


def actor_bundle(rc: RayConfig, cluster: dict[str, float], sources: int, reserved_cpus: float = 0.0) -> dict[str, float]:
    """The resources of one source actor: ``ray.cpus_per_worker`` CPUs, or automatically
    min(1, (cluster CPUs − ``reserved_cpus``) / sources); GPUs by :func:`worker_gpus`.
    Fractions are rounded down to Ray's resolution. ``CPU`` may come out ≤ 0 when
    ``reserved_cpus`` takes the whole cluster: the caller says what to lower."""
    cpus = rc.cpus_per_worker or min(1.0, (cluster.get("CPU", 1.0) - reserved_cpus) / max(1, sources))
    gpus = worker_gpus(rc.gpus_per_worker, cluster.get("GPU", 0.0), sources)
    bundle = {"CPU": round_down(cpus)}
    if gpus > 0:
        bundle["GPU"] = round_down(gpus)
    return bundle


def actor_threads(cpus: float) -> int:
    """torch CPU threads of an actor that reserved ``cpus`` CPUs: rounded down, at least 1."""
    return max(1, int(cpus))


def actor_bundle_offset(bundles: int, sources: int) -> int | None:
    """Where the source actors' bundles start in a caller's placement group of ``bundles``
    bundles (a Tune trial: its own bundle first, then one per source), or None when the group
    has no room for them (then the backend reserves a group of its own)."""
    return bundles - sources if bundles > sources else None


__all__ = ["actor_bundle", "actor_bundle_offset", "actor_threads", "round_down", "worker_gpus"]

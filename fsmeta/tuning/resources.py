"""The placement group of one trial: its own bundle, then one per source actor
(the layout :mod:`fsmeta.meta.resources` describes and the Ray backend reads)."""

from __future__ import annotations

from fsmeta.config import Config
from fsmeta.errors import FsmetaError
from fsmeta.meta.resources import actor_bundle


def trial_resources(cfg: Config, n_sources: int, cluster: dict[str, float]) -> list[dict[str, float]]:
    """The bundles of one trial: the trial's own, then one per source actor (Ray backend).

    Source actors take ``ray.cpus_per_worker`` CPUs, or automatically
    min(1, (cluster CPUs − trial CPUs) / sources); GPUs: ``ray.gpus_per_worker``, or the
    automatic share of :func:`fsmeta.meta.resources.worker_gpus` (GPUs shared evenly).
    """
    own = {"CPU": cfg.tune.trial_cpus}
    if cfg.tune.trial_gpus > 0:
        own["GPU"] = cfg.tune.trial_gpus
    if cfg.meta.backend != "ray" or n_sources == 0:
        return [own]
    actor = actor_bundle(cfg.ray, cluster, n_sources, reserved_cpus=cfg.tune.trial_cpus)
    if actor["CPU"] <= 0:
        raise FsmetaError(
            f"a trial takes tune.trial_cpus={cfg.tune.trial_cpus} of the cluster's {cluster.get('CPU', 0.0):g} CPUs, "
            f"leaving none for its {n_sources} source actors; lower tune.trial_cpus or set ray.cpus_per_worker"
        )
    return [own] + [dict(actor) for _ in range(n_sources)]


def fits(bundles: list[dict[str, float]], cluster: dict[str, float]) -> bool:
    return all(sum(b.get(r, 0.0) for b in bundles) <= cluster.get(r, 0.0) + 1e-9 for r in ("CPU", "GPU"))

"""The ``ray`` backend: every source's inner loop on its own Ray actor (SPEC §5).

:class:`RayBackend` is what ``meta.backend=ray`` builds. At start it connects
to Ray, puts every source's crop pool into the object store once, reserves one
bundle per source in a placement group and starts one
:class:`~fsmeta.meta.workers.SourceWorker` in each. Per meta-iteration it puts θ
once, calls every worker with its task spec and returns the adapted states in
source order; the caller (``fsmeta.train.meta_train``) forms the meta-update.

Exactness: a worker runs the same ``adapt`` on the same pixels as the
``sequential`` backend, with the same number of torch threads
(``meta.inner_threads``, 1 by default), so on CPU both give bit-identical θ, in
fp32 and in bf16 alike (some CPU kernels sum in a different order with another
thread count; ``meta.inner_threads=0`` lets each actor use the CPUs it reserves,
and the backends then differ).

Fault tolerance: actors restart (``ray.max_restarts``) and a call lost with its
actor or node is re-run (``ray.max_task_retries``; unlimited by default, since
Ray notices a lost node only after ~16 s). Should an actor be dead for good
anyway, the driver re-creates it and re-runs its task. Every call is a pure
function of (θ, task), so none of this changes the result.

Connection: ``ray.address``, else ``$RAY_ADDRESS`` (set for ``ray job submit``
drivers), else a new local instance bound to 127.0.0.1 (GCS, raylet, workers and
agents; the dashboard off or on 127.0.0.1 too), so nothing fsmeta starts is
reachable from another machine. A Ray already initialised in this process is
reused and left running.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fsmeta.config import Config
from fsmeta.data.sampling import TaskSpec
from fsmeta.errors import FsmetaError
from fsmeta.meta.reptile import AdaptResult, InnerSettings
from fsmeta.meta.resources import actor_bundle, actor_bundle_offset, actor_threads
from fsmeta.meta.sources import SourceData
from fsmeta.models import StateDict
from fsmeta.meta.workers import SourceWorker, WorkerResult, state_from_numpy, state_to_numpy

log = logging.getLogger(__name__)

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def connect(cfg: Config, min_cpus: float = 0.0) -> bool:
    """Attach to Ray as configured; True when this call started a new local instance.

    A new local instance gets ``ray.num_cpus`` CPUs, or when that is 0 this
    machine's count raised to ``min_cpus`` (Ray's CPUs are reservations, so
    four source actors may share two cores; they are then slower, not wrong).
    With ``ray.cpus_per_worker=0`` (automatic) each actor reserves
    min(1, cluster CPUs / sources), so the default fits any machine.
    """
    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(min_cpus))
    with _loopback_node():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=cfg.ray.include_dashboard,
                 dashboard_host="127.0.0.1", logging_level=logging.WARNING)
    return True


@contextlib.contextmanager
def _loopback_node():
    """Make a local instance started inside this block take 127.0.0.1 as its node address.

    On Linux Ray binds GCS, raylet and workers to the node address, which it takes
    from the outward-facing interface; ``_node_ip_address="127.0.0.1"`` is turned
    back into that address. Ray's own switch for a single-machine instance (the
    macOS/Windows default, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) is read at
    import, so it is flipped here for the duration of ``ray.init`` only; a later
    ``ray.init(address=...)`` to a cluster still finds the real node address.
    """
    from ray._private import ray_constants

    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


class RayBackend:
    """One :class:`SourceWorker` actor per source, in one placement group.

    Args:
        cfg: the run configuration; ``cfg.ray`` says where and how actors run.
        sources: the sources, opened by the driver (their pools go into the object store).
    """

    name = "ray"

    def __init__(self, cfg: Config, sources: list[SourceData]) -> None:
        rc = cfg.ray
        if rc.placement_strategy not in STRATEGIES:
            raise FsmetaError(f"ray.placement_strategy={rc.placement_strategy!r} is not one of {', '.join(STRATEGIES)}")
        if rc.cpus_per_worker < 0:
            raise FsmetaError(f"ray.cpus_per_worker={rc.cpus_per_worker} must be positive, or 0 for automatic")
        self.cfg = cfg
        self.names = [s.name for s in sources]
        self.settings = InnerSettings.from_config(cfg)
        self.workers: list[Any] = []
        self.pg = None
        self._owns_pg = True  # False when the actors run in bundles of the caller's placement group
        self.bundle_offset = 0
        self.pool_refs: list[Any] = []
        self.last_compute_seconds: list[float] = []  # adapt() time per source in the last run (benchmarks)
        self._started_ray = connect(cfg, min_cpus=len(sources) * rc.cpus_per_worker)
        try:
            bundle = actor_bundle(rc, ray.cluster_resources(), len(sources))
            self.cpus, self.gpus = bundle["CPU"], bundle.get("GPU", 0.0)
            # Each pool is put once; every worker but its owner gets the reference.
            self.pool_refs = [ray.put(s) for s in sources]
            self._actor_cls = ray.remote(SourceWorker)
            current = get_current_placement_group()
            offset = actor_bundle_offset(len(current.bundle_specs), len(sources)) if current is not None else None
            if offset is not None:
                # Inside a Tune trial reserved with tune.PlacementGroupFactory (fsmeta.tuning): the
                # source actors take the trial's last bundles, sized by fsmeta.tuning.resources.
                self.bundle_offset = offset
                spec = current.bundle_specs[offset]
                self.cpus, self.gpus = float(spec.get("CPU", 0.0)), float(spec.get("GPU", 0.0))
                self.pg, self._owns_pg = current, False
            else:
                self.pg = self._reserve(len(sources))
            self.threads = cfg.meta.inner_threads or actor_threads(self.cpus)
            self.workers = [self._start(i) for i in range(len(sources))]
            where = ray.get([w.ready.remote() for w in self.workers])
            for info in where:
                log.info("source actor %(source)s: pid %(pid)s on node %(node)s, %(device)s %(precision)s, %(threads)s thread(s), %(crops)s crops", info)
        except BaseException:
            self.close()
            raise

    def _reserve(self, n: int):
        bundle = {"CPU": self.cpus}
        if self.gpus > 0:
            bundle["GPU"] = self.gpus
        pg = placement_group([dict(bundle) for _ in range(n)], strategy=self.cfg.ray.placement_strategy,
                             name=f"fsmeta-meta-{os.getpid()}")
        try:
            ray.get(pg.ready(), timeout=self.cfg.ray.placement_timeout_s)
        except GetTimeoutError:
            remove_placement_group(pg)
            free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            raise FsmetaError(
                f"Ray could not place {n} source actors of {bundle} each ({self.cfg.ray.placement_strategy}) within "
                f"{self.cfg.ray.placement_timeout_s:.0f} s; the cluster has {free} free. Lower ray.cpus_per_worker / "
                "ray.gpus_per_worker (fractions are allowed) or add nodes"
            ) from None
        return pg

    def _start(self, index: int):
        pools = {j: ref for j, ref in enumerate(self.pool_refs) if j != index}
        actor_cls = self._actor_cls.options(
            num_cpus=self.cpus,
            num_gpus=self.gpus,
            max_restarts=self.cfg.ray.max_restarts,
            max_task_retries=self.cfg.ray.max_task_retries,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=self.bundle_offset + index),
        )
        return actor_cls.remote(self.cfg, index, self.names, pools, self.settings, self.threads)

    def run(self, theta: StateDict, tasks: list[TaskSpec]) -> list[AdaptResult]:
        """θ_m for every task, in task order; θ is put into the object store once."""
        theta_ref = ray.put(state_to_numpy(theta))
        futures = [self.workers[t.m].run.remote(theta_ref, t) for t in tasks]
        results: list[WorkerResult] = []
        for task, future in zip(tasks, futures):
            results.append(self._get(future, task, theta_ref))
        self.last_compute_seconds = [r.compute_seconds for r in results]
        return [AdaptResult(state_from_numpy(r.theta), r.losses) for r in results]

    def _get(self, future, task: TaskSpec, theta_ref) -> WorkerResult:
        """The result of one call; an actor dead for good is re-created and its task re-run."""
        for attempt in range(self.cfg.ray.recreate_attempts + 1):
            try:
                return ray.get(future)
            except RayTaskError as exc:
                # An error raised inside adapt (e.g. a non-finite loss): not a fault to retry.
                cause = exc.cause if isinstance(exc.cause, BaseException) else None
                raise (cause or exc) from None
            except RayActorError as exc:
                if attempt == self.cfg.ray.recreate_attempts:
                    raise FsmetaError(
                        f"the actor of source {self.names[task.m]} died {attempt + 1} time(s) in meta-iteration "
                        f"{task.iteration + 1}: {exc}"
                    ) from None
                log.warning("actor of source %s is dead (%s); re-creating it and re-running its task",
                            self.names[task.m], type(exc).__name__)
                ray.kill(self.workers[task.m], no_restart=True)
                self.workers[task.m] = self._start(task.m)
                future = self.workers[task.m].run.remote(theta_ref, task)
        raise AssertionError("unreachable")

    def worker_info(self) -> list[dict[str, Any]]:
        """Where each worker runs now (pid, node, device, threads)."""
        return ray.get([w.ready.remote() for w in self.workers])

    def close(self) -> None:
        """Kill the actors, free the placement group, and stop Ray if this backend started it."""
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already gone: nothing to free
                pass
        self.workers = []
        if self.pg is not None and self._owns_pg:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None
        self.pool_refs = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False


"""The ray backend against the sequential reference: bit-identical θ, metrics, clear errors.

Exactness holds because both backends run every inner loop with ``meta.inner_threads``
torch threads (1 by default), whatever the driver's ``threads`` and the CPUs the actors reserve.
"""

import pytest
import torch

from fsmeta.checkpoint import load_checkpoint
from fsmeta.errors import FsmetaError, NonFiniteLossError
from fsmeta.tracking import Tracker
from fsmeta.meta.sources import load_sources
from fsmeta.train import initial_theta, meta_train

OFF = Tracker(enabled=False)
DOMAINS = ["synth-fluo", "synth-nuclei", "synth-em", "synth-phase"]


def _sources(n: int) -> str:
    return f"data.sources=[{', '.join(DOMAINS[:n])}]"


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("n_sources, amp, augment",
                         [(n, amp, False) for n in (1, 2, 4) for amp in ("off", "bf16")] + [(2, "bf16", True)])
def test_ray_and_sequential_give_bit_identical_weights(tiny_config, tmp_path, ray_session, n_sources, amp, augment):
    ray_session()
    # ray.cpus_per_worker=0 (automatic): four actors share the session's two CPUs, half a CPU
    # each; the driver runs 2 threads (tiny_config), every inner loop meta.inner_threads=1.
    # bf16: autocast on this CPU whether or not it has native bf16 (then emulated, still exact).
    # augment: every inner step draws its symmetries and jitter from (seed, iteration, source, step).
    common = [_sources(n_sources), "meta.iterations=3", f"compute.amp={amp}", f"augment.meta={str(augment).lower()}"]
    seq = tiny_config(*common, "meta.backend=sequential")
    ray_cfg = tiny_config(*common, "meta.backend=ray")
    a, _ = load_checkpoint(meta_train(seq, tmp_path / "seq", OFF, progress=False))
    b, meta = load_checkpoint(meta_train(ray_cfg, tmp_path / "ray", OFF, progress=False))
    assert meta["iteration"] == 3 and meta["sources"] == DOMAINS[:n_sources]
    assert_same_state(a, b)
    assert not torch.equal(a["head.weight"], initial_theta("fcrn", 0)["head.weight"])  # it did train


def test_ray_backend_logs_per_source_losses_and_seconds(tiny_config, tmp_path, ray_session, capsys):
    ray_session()
    from fsmeta.tracking import tracker_from_config

    cfg = tiny_config("meta.backend=ray", "threads=1", "tracking.enabled=true",
                      f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    tracker = tracker_from_config(cfg.tracking)
    _, meta = load_checkpoint(meta_train(cfg, tmp_path / "out", tracker, progress=True))
    run = tracker.client.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for key in ("loss.synth-fluo", "loss.synth-nuclei", "sec_per_iter", "loss"):
        assert len(tracker.client.get_metric_history(run.info.run_id, key)) == cfg.meta.iterations, key
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[meta-train")]
    line = lines[-1]
    assert "3/3" in line and "s/it" in line and "synth-fluo=" in line and "synth-nuclei=" in line


def test_a_non_finite_loss_on_an_actor_names_the_source(tiny_config, ray_session):
    ray_session()
    from fsmeta.data.sampling import make_task
    from fsmeta.meta.driver import RayBackend

    cfg = tiny_config("threads=1")
    sources = load_sources(cfg)
    theta = initial_theta(cfg.arch, 0)
    theta["enc1.0.weight"] = torch.full_like(theta["enc1.0.weight"], float("nan"))
    backend = RayBackend(cfg, sources)
    try:
        tasks = [make_task(0, 0, m, [len(s.crops) for s in sources], 2) for m in range(2)]
        with pytest.raises(NonFiniteLossError, match="loss is nan at inner step 0 of source synth-fluo"):
            backend.run(theta, tasks)
    finally:
        backend.close()
    import ray

    assert ray.is_initialized()  # the session's instance was reused, and is left running


def test_unplaceable_actors_fail_with_the_free_resources(tiny_config, ray_session):
    ray_session()
    from fsmeta.meta.driver import RayBackend

    cfg = tiny_config("ray.cpus_per_worker=3", "ray.placement_timeout_s=1")
    with pytest.raises(FsmetaError, match=r"could not place 2 source actors of \{'CPU': 3.0\}.*free"):
        RayBackend(cfg, load_sources(cfg))

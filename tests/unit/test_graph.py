"""The graph scheduler's policy (fsmeta.graph): what units reserve, the order they start in, the cap,
and the simulator with its lower bound. Pure arithmetic: no ray, no torch."""

import pytest

from fsmeta import graph
from fsmeta.benchmark import cell_key, grid, study_graph
from fsmeta.config import load_config
from fsmeta.errors import FsmetaError
from fsmeta.meta.resources import actor_bundle_offset

CLUSTER = {"CPU": 32.0, "GPU": 8.0}  # 4 nodes × (8 CPUs, 2 GPUs)


def paper_like(*overrides):
    return load_config(None, ["study.datasets=[a, b, c, d, e]", "study.targets=[a, b]", "study.archs=[fcrn]",
                              "study.pretrainings=[meta-bce, meta-all, transfer, scratch]", "meta.backend=ray",
                              "study.cell_gpus=0.25", "eval.shots=[1, 5]", "eval.seeds=[0, 1]", *overrides])


def units_of(cfg, cluster=CLUSTER):
    cells = grid(cfg)
    n = {(t, a): 4 for t in cfg.study.targets for a in cfg.study.archs}
    return study_graph(cfg, cells, cluster, n_sources=n), cells


def test_a_meta_training_reserves_its_driver_and_one_bundle_per_source_actor():
    units, cells = units_of(paper_like())
    meta = next(u for u in units if u.kind == "meta")
    assert meta.bundles[0] == {"CPU": 1.0}
    assert list(meta.bundles[1:]) == [{"CPU": 1.0, "GPU": 1.0}] * 4
    assert actor_bundle_offset(len(meta.bundles), 4) == 1  # where the Ray backend looks for its actors' bundles
    transfer = next(u for u in units if u.kind == "transfer")
    assert transfer.bundles == ({"CPU": 1.0, "GPU": 1.0},)
    assert next(u for u in units if u.kind == "scratch").demand["GPU"] == 0
    cell = next(u for u in units if u.kind == "cell")
    assert cell.bundles == ({"CPU": 1.0, "GPU": 0.25},) and cell.deps == ("meta/a/fcrn/meta-bce",)
    assert len([u for u in units if u.kind == "cell"]) == len(cells) and cell.key == cell_key(cells[0])


def test_the_2023_pipeline_puts_theta_prime_between_a_pretraining_and_its_cells():
    units, _ = units_of(paper_like("eval.protocol=2023", "select.pretext_epochs=1"))
    pretext = next(u for u in units if u.kind == "pretext")
    assert pretext.deps == ("meta/a/fcrn/meta-bce",)
    assert next(u for u in units if u.kind == "cell").deps == (pretext.key,)


def test_meta_trainings_start_first_and_a_blocked_one_is_not_starved_by_gpu_units():
    units, _ = units_of(paper_like())
    g = graph.Graph({u.key: u for u in units})
    first = g.start(CLUSTER)
    # two meta-trainings take the 8 GPUs; the third waits, and so do transfers; scratch needs no GPU and starts
    assert [u.kind for u in first] == ["meta", "meta", "scratch", "scratch"]
    g.finish(first[0].key)
    g.finish(first[2].key)
    nxt = g.start(CLUSTER)
    assert [u.kind for u in nxt] == ["meta"]  # the third meta-training, not meta-bce's cells
    for u in [first[1], nxt[0]]:
        g.finish(u.key)
    after = g.start(CLUSTER)
    # the last meta-training, then the transfer trainings, then cells in what is left
    assert [u.kind for u in after[:3]] == ["meta", "transfer", "transfer"] and all(u.kind == "cell" for u in after[3:])
    assert sum(u.demand["GPU"] for u in after) == CLUSTER["GPU"]


def test_a_per_study_cap_limits_what_the_study_holds_and_a_unit_larger_than_it_is_refused():
    cfg = paper_like("study.max_gpus=4")
    cap = graph.capacity(cfg, CLUSTER)
    assert cap == {"CPU": 32.0, "GPU": 4.0}
    units, _ = units_of(cfg)
    g = graph.Graph({u.key: u for u in units})
    assert sum(u.demand["GPU"] for u in g.start(cap)) <= 4
    with pytest.raises(FsmetaError, match="needs"):
        graph.check_fits(units, graph.capacity(paper_like("study.max_gpus=2"), CLUSTER))


def test_simulated_schedules_respect_dependencies_capacity_and_the_lower_bound():
    units, _ = units_of(paper_like())
    seconds = {u.key: {"meta": 100.0, "transfer": 30.0, "scratch": 0.1, "cell": 5.0}[u.kind] for u in units}
    by_key = {u.key: u for u in units}
    bound = graph.lower_bound(units, seconds, CLUSTER)
    for simulate in (graph.simulate, graph.simulate_sequential):
        spans = simulate(units, seconds, CLUSTER)
        assert set(spans) == set(by_key)
        for key, (start, _) in spans.items():
            assert all(spans[d][1] <= start + 1e-9 for d in by_key[key].deps)
        times = sorted({t for span in spans.values() for t in span})
        for t in times:
            held = sum(by_key[k].demand["GPU"] for k, (a, b) in spans.items() if a <= t < b)
            assert held <= CLUSTER["GPU"] + 1e-9
        assert max(b for _, b in spans.values()) >= bound - 1e-9
    graph_wall = max(b for _, b in graph.simulate(units, seconds, CLUSTER).values())
    sequential_wall = max(b for _, b in graph.simulate_sequential(units, seconds, CLUSTER).values())
    assert graph_wall < sequential_wall

"""eval.pool_threshold in a benchmark cell: the unannotated images it reads are the split's pool
outside the support (never a test image), and it starts from the bands' own threshold."""

import numpy as np
import pytest

import fsmeta.study
from fsmeta.data.registry import load_dataset
from fsmeta.study import Cell, cell_split, run_cell, unannotated_draw
from fsmeta.config import load_config
from fsmeta.train import scratch_checkpoint
from tests.conftest import TINY

CELL = ["eval.protocol=2023", "eval.test_fraction=0.25", "finetune.holdout=0.25", "finetune.crop_size=32",
        "data.finetune_stride={default: 16}", "finetune.steps=4", "finetune.val_every=2",
        "eval.pool_images=3", "select.unit=image"]


def _config(tmp_path, *overrides):
    tiny = [o for o in TINY if not o.startswith("finetune.epochs=")]  # a step budget: epochs are refused beside it
    return load_config(None, [*tiny, f"data.root={tmp_path / 'data'}", *CELL, *overrides])


def test_a_cell_reads_the_pool_outside_its_support_and_never_a_test_image(tmp_path, monkeypatch):
    cfg = _config(tmp_path, "eval.pool_threshold=true")
    target = load_dataset(cfg.data.target, cfg)
    checkpoint = scratch_checkpoint(cfg, tmp_path / "pre")
    seen = []
    rule = fsmeta.study.decision_rule
    monkeypatch.setattr(fsmeta.study, "decision_rule", lambda *a, **k: (seen.append(list(a[5])), rule(*a, **k))[1])
    cell = Cell(cfg.data.target, cfg.arch, "scratch", "random", 1, 1)
    metrics, _, test = run_cell(cfg, target, checkpoint, cell)
    pool, fixed = cell_split(cfg, len(target), 1)
    assert np.array_equal(test, fixed) and len(seen) == 1 and len(seen[0]) == 3
    # the support image is the one of the pool whose annotation the cell reports
    shares = {int(i): np.count_nonzero(target.masks[int(i)]) / target.masks[int(i)].size for i in pool}
    support = [i for i, s in shares.items() if abs(s - metrics["support_foreground"]) < 1e-12]
    assert len(support) == 1
    expected = unannotated_draw(pool, support, 3, 1)
    assert support[0] not in expected and not set(expected) & set(test.tolist())
    for image, i in zip(seen[0], expected):
        assert np.array_equal(image, target.image(int(i)))
    assert metrics["pool_used"] in (0.0, 1.0) and 0 < metrics["pool_ratio"]
    # the same cell without the option scores at the threshold the pool started from
    plain, _, _ = run_cell(_config(tmp_path, "eval.pool_threshold=false"), target, checkpoint, cell)
    assert plain["threshold"] == pytest.approx(metrics["pool_bands_threshold"]) and "pool_used" not in plain
    k = (round(100 * metrics["pool_bands_threshold"]) + round(100 * metrics["pool_match_threshold"])) // 2
    assert metrics["threshold"] == pytest.approx(k / 100 if metrics["pool_used"] else plain["threshold"])


def test_the_2020_protocol_has_no_unannotated_image_and_scores_as_without_the_option(tmp_path, monkeypatch):
    """The default (on) reads nothing in the 2020 protocol, where every image outside the support is
    a test image: the cell is the one without the option, bit for bit, and no pool image is predicted."""
    cfg = _config(tmp_path, "eval.protocol=2020")
    assert cfg.eval.pool_threshold is True  # the built-in default
    target = load_dataset(cfg.data.target, cfg)
    checkpoint = scratch_checkpoint(cfg, tmp_path / "pre")
    cell = Cell(cfg.data.target, cfg.arch, "scratch", "random", 1, 0)
    curves = []
    share = fsmeta.study.pool_share_curve
    monkeypatch.setattr(fsmeta.study, "pool_share_curve", lambda *a, **k: (curves.append(1), share(*a, **k))[1])
    on, _, test_on = run_cell(cfg, target, checkpoint, cell)
    off, _, test_off = run_cell(_config(tmp_path, "eval.protocol=2020", "eval.pool_threshold=false"), target, checkpoint, cell)
    assert not curves and "pool_used" not in on and "holdout_iou" in on
    on.pop("ranking_seconds"), off.pop("ranking_seconds")  # the only measured (not computed) entry
    assert on == off and np.array_equal(test_on, test_off)

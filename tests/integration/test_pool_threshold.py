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


def test_a_patch_support_holds_out_whole_annotated_patches(tmp_path, monkeypatch):
    """select.unit=patch with finetune.holdout: a share of the selected patches (those holding
    foreground) is kept out of training and chooses the step and the threshold, as bands do for
    whole images; without finetune.holdout every patch trains."""
    cfg = _config(tmp_path, "select.unit=patch", "select.patch_size=32", "select.patch_stride=32",
                  "select.patches_per_shot={default: 8}", "eval.pool_threshold=false")
    target = load_dataset(cfg.data.target, cfg)
    checkpoint = scratch_checkpoint(cfg, tmp_path / "pre")
    held, trained = [], []
    patches, tune = fsmeta.study.hold_out_patches, fsmeta.study.finetune
    monkeypatch.setattr(fsmeta.study, "hold_out_patches", lambda *a, **k: (held.append((a, patches(*a, **k))), held[-1][1])[1])
    monkeypatch.setattr(fsmeta.study, "finetune", lambda m, x, *a, **k: (trained.append((len(x), k.get("holdout"))), tune(m, x, *a, **k))[1])
    cell = Cell(cfg.data.target, cfg.arch, "scratch", "random", 1, 0)
    metrics, _, _ = run_cell(cfg, target, checkpoint, cell)
    (args, holdout), = held
    windows = args[1]
    assert len(windows) == 8 and args[2] == 0.25 and trained == [(8, holdout)]
    out = sorted(set(range(8)) - set(holdout.train_rows.tolist()))
    assert len(out) == metrics["holdout_bands"] == 2 and metrics["holdout_train_crops"] == 6
    for r, mask in zip(out, holdout.masks):  # each held-out patch is an annotated patch that holds foreground
        i, y, x, h, w = windows[r]
        assert np.array_equal(mask, target.masks[i][y:y + h, x:x + w] > 0) and mask.any()
    assert metrics["threshold"] == pytest.approx(metrics["holdout_threshold"])
    held.clear(), trained.clear()
    plain, _, _ = run_cell(_config(tmp_path, "select.unit=patch", "select.patch_size=32", "select.patch_stride=32",
                                   "select.patches_per_shot={default: 8}", "finetune.holdout=0"), target, checkpoint, cell)
    assert not held and trained == [(8, None)] and "holdout_iou" not in plain

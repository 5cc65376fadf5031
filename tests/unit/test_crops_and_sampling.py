import numpy as np
import pytest

from fsmeta.data.crops import build_crop_index, fitted_crop, gather, grid_positions, window_foreground
from fsmeta.data.sampling import draw_support, make_task, protocol_split, held_out_images
from fsmeta.data.store import ImageSet
from fsmeta.errors import DataError, FsmetaError


def _set(images, masks):
    n = len(images)
    return ImageSet("toy", [f"i{k}" for k in range(n)], images, masks, ["train"] * n, [""] * n)


def test_window_foreground_counts_match_direct_sums():
    rng = np.random.default_rng(1)
    mask = (rng.random((37, 50)) > 0.5).astype(np.uint8)
    ys, xs, counts = window_foreground(mask, 16, 7)
    assert list(ys) == [0, 7, 14, 21] and list(xs) == [0, 7, 14, 21, 28]
    for a, y in enumerate(ys):
        for b, x in enumerate(xs):
            assert counts[a, b] == mask[y : y + 16, x : x + 16].sum()


def test_a_covering_grid_adds_the_windows_flush_with_the_far_edges():
    rng = np.random.default_rng(1)
    mask = (rng.random((37, 50)) > 0.5).astype(np.uint8)
    ys, xs, counts = window_foreground(mask, 16, 7, cover=True)
    # 37 − 16 = 21 is on the grid already; 50 − 16 = 34 is not: the last window starts there
    assert list(ys) == [0, 7, 14, 21] and list(xs) == [0, 7, 14, 21, 28, 34]
    for a, y in enumerate(ys):
        for b, x in enumerate(xs):
            assert counts[a, b] == mask[y : y + 16, x : x + 16].sum()
    assert list(grid_positions(360, 128, 64, cover=True)) == [0, 64, 128, 192, 232]
    assert list(grid_positions(512, 128, 64, cover=True)) == list(grid_positions(512, 128, 64)) == [0, 64, 128, 192, 256, 320, 384]
    assert list(grid_positions(100, 128, 64, cover=True)) == []  # the window does not fit at all
    s = _set([np.zeros((37, 50), np.uint8)], [mask])
    plain = build_crop_index(s, 16, 7, min_foreground=0)
    covered = build_crop_index(s, 16, 7, min_foreground=0, cover=True)
    assert (len(plain), len(covered)) == (4 * 5, 4 * 6)
    seen = np.zeros(mask.shape, bool)
    for y, x in zip(covered.y, covered.x):
        seen[y : y + 16, x : x + 16] = True
    assert seen.all()  # every pixel lies in some window


def test_fitted_crop_shrinks_to_the_smallest_image_of_the_subset():
    masks = [np.zeros((48, 60), np.uint8), np.zeros((200, 90), np.uint8), np.zeros((130, 140), np.uint8)]
    s = _set([m.copy() for m in masks], masks)
    # 48 px is the smallest side; 48 is a multiple of 8; 22 foreground pixels of a 64² crop → 22·(48/64)² = 12.375
    assert fitted_crop(s, 64, 22) == (48, 12, "the smallest image side is 48 px, less than the 64-px crop; "
                                                "using 48×48 crops with at least 12 foreground pixels instead")
    # only the subset counts: 90 → 88; a zero threshold (the pretext) stays zero
    assert fitted_crop(s, 128, 88, subset=[1, 2])[:2] == (88, 42)  # 88·(88/128)² = 41.59 → 42
    assert fitted_crop(s, 128, 0, subset=[1])[:2] == (88, 0)
    assert fitted_crop(s, 128, 88, subset=[2]) == (128, 88, "")
    assert fitted_crop(s, 64, 1)[1] == 1  # a positive threshold never rounds to 0


def test_crops_are_inside_the_image_and_filtered_by_foreground():
    mask = np.zeros((8, 12), np.uint8)
    mask[0:4, 0:4] = 1  # 16 foreground pixels, all in the top-left 4×4
    img = np.arange(96, dtype=np.uint8).reshape(8, 12)
    s = _set([img], [mask])
    idx = build_crop_index(s, size=4, stride=4, min_foreground=1)
    assert list(zip(idx.y, idx.x)) == [(0, 0)]  # the only window with foreground; none past the edge
    idx = build_crop_index(s, size=4, stride=2, min_foreground=4)  # (0,0):16, (0,2):8, (2,0):8, (2,2):4
    assert sorted(zip(idx.y.tolist(), idx.x.tolist())) == [(0, 0), (0, 2), (2, 0), (2, 2)]
    x, y = gather(s, idx, [0])
    assert x.shape == (1, 1, 4, 4) and x.dtype == np.float32
    y0, x0 = idx.y[0], idx.x[0]
    assert np.allclose(x[0, 0], (img[y0 : y0 + 4, x0 : x0 + 4] / 255.0 - 0.5) / 0.5)
    assert np.array_equal(y[0, 0], mask[y0 : y0 + 4, x0 : x0 + 4])


def test_gather_into_given_memory_equals_the_copying_formula_exactly():
    rng = np.random.default_rng(3)
    u8 = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    f32 = rng.random((20, 24), dtype=np.float32)
    masks = [(rng.random((20, 24)) > 0.5).astype(np.uint8) for _ in range(2)]
    s = _set([u8, f32], masks)
    idx = build_crop_index(s, size=8, stride=4, min_foreground=0)
    rows = [5, 0, len(idx) - 1, 5]
    x, y = gather(s, idx, rows)
    for k, r in enumerate(rows):  # the formula of SPEC §3.1, as fsmeta computed it before gathering in place
        i, y0, x0 = idx.image[r], idx.y[r], idx.x[r]
        img = s.images[i][y0 : y0 + 8, x0 : x0 + 8]
        unit = img * np.float32(1 / 255) if img.dtype == np.uint8 else img
        assert np.array_equal(x[k, 0], (unit - np.float32(0.5)) / np.float32(0.5))
        assert np.array_equal(y[k, 0], masks[i][y0 : y0 + 8, x0 : x0 + 8])
    bx, by = np.full((6, 1, 8, 8), 7, np.float32), np.full((6, 1, 8, 8), 7, np.float32)
    gx, gy = gather(s, idx, rows, out=(bx[1:5], by[1:5]))  # e.g. a slice of a pinned batch
    assert np.shares_memory(gx, bx) and np.array_equal(bx[1:5], x) and np.array_equal(by[1:5], y)
    assert (bx[0] == 7).all() and (bx[5] == 7).all()  # nothing written outside the slice
    with pytest.raises(ValueError, match="out arrays must be float32 of shape"):
        gather(s, idx, rows, out=(bx, by))


def test_no_crops_is_a_clear_error():
    s = _set([np.zeros((10, 10), np.uint8)], [np.zeros((10, 10), np.uint8)])
    with pytest.raises(DataError, match="toy: no training crops.*360 foreground"):
        build_crop_index(s, 8, 2, 360)
    with pytest.raises(DataError, match="smaller than 16×16"):
        build_crop_index(s, 16, 2, 0)


def test_a_source_of_images_smaller_than_the_crop_names_the_way_out(tmp_path, tiny_config):
    from PIL import Image

    from fsmeta.data.io import import_folder
    from fsmeta.meta.sources import load_sources

    rng = np.random.default_rng(0)
    for d in ("images", "masks"):
        (tmp_path / d).mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(tmp_path / "images" / f"t{i}.png")
        Image.fromarray(np.full((40, 48), 255, np.uint8)).save(tmp_path / "masks" / f"t{i}.png")
    cfg = tiny_config("data.sources=[tiles]", "data.target=synth-em")
    import_folder(cfg.data.root, "tiles", tmp_path / "images", tmp_path / "masks")
    with pytest.raises(DataError, match=r"tiles: no training crops \(2 image\(s\) smaller than 64×64\); as a source of "
                                        r"target synth-em it needs 64×64 windows .* leave it out of the sources "
                                        r"\(study.datasets / data.sources\) or lower data.crop_size"):
        load_sources(cfg)


def test_support_draws_are_seeded_nested_and_bounded():
    pool = np.arange(10, 30)
    a = draw_support(pool, 5, seed=3)
    assert np.array_equal(a, draw_support(pool, 5, seed=3))
    assert not np.array_equal(a, draw_support(pool, 5, seed=4))
    assert set(draw_support(pool, 1, 3)) <= set(draw_support(pool, 3, 3)) <= set(a)
    assert len(set(a)) == 5 and set(a) <= set(pool)
    with pytest.raises(FsmetaError, match="K=21 is larger than the pool of 20 image"):
        draw_support(pool, 21, 0)


def test_protocols_never_test_on_support_images():
    pool, fixed = protocol_split(50, "2020")
    support = draw_support(pool, 5, 0)
    assert fixed is None and set(held_out_images(50, pool, fixed, support)) == set(range(50)) - set(support)
    pool, fixed = protocol_split(50, "2023", 0.2, split_seed=1)
    assert len(fixed) == 10 and not set(pool) & set(fixed) and len(pool) == 40
    assert np.array_equal(protocol_split(50, "2023", 0.2, split_seed=1)[1], fixed)
    assert not set(draw_support(pool, 10, 2)) & set(held_out_images(50, pool, fixed, draw_support(pool, 10, 2)))


def test_tasks_are_a_pure_function_of_seed_iteration_and_source():
    t1 = make_task(0, 5, 1, [10, 20, 30, 40], 5)
    t2 = make_task(0, 5, 1, [10, 20, 30, 40], 5)
    assert t1.n == t2.n and np.array_equal(t1.labelled, t2.labelled) and np.array_equal(t1.unlabelled_p, t2.unlabelled_p)
    assert t1.n != 1 and t1.p != 1 and t1.labelled.max() < 20
    ns = {make_task(0, it, 0, [10, 10, 10, 10], 2).n for it in range(50)}
    assert ns == {1, 2, 3}
    small = make_task(0, 0, 0, [3, 3], 5)  # fewer crops than K: drawn with replacement
    assert len(small.labelled) == 5


def test_batch_stream_is_full_batches_over_seeded_epochs():
    from fsmeta.data.sampling import batch_stream

    stream = batch_stream(5, 3, (9, 1))
    rows = np.concatenate([next(stream) for _ in range(5)])  # 15 rows = 3 epochs of 5
    for e in range(3):
        assert sorted(rows[5 * e:5 * e + 5]) == list(range(5))
        assert list(rows[5 * e:5 * e + 5]) == list(np.random.default_rng([9, 1, e]).permutation(5))
    again = batch_stream(5, 3, (9, 1))
    assert all(np.array_equal(next(again), rows[3 * k:3 * k + 3]) for k in range(5))


def test_finetune_step_budget_takes_exactly_its_steps():
    import torch

    from fsmeta.config import FinetuneConfig
    from fsmeta.finetune import finetune
    from fsmeta.models import build_model

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((8, 1, 16, 16)).astype(np.float32))
    y = (x > 0.5).float()
    seen = []
    torch.manual_seed(0)
    model = build_model("fcrn")
    original = model.forward_with_latent
    model.forward_with_latent = lambda t: (seen.append(len(t)), original(t))[1]
    _, history = finetune(model, x, y, FinetuneConfig(steps=7, batch_size=3), seed=0)
    assert seen == [3] * 7  # seven full batches, across epochs of 8 crops
    assert len(history) == 3  # read every min(3 batches per epoch, 50) steps: after steps 3, 6 and 7
    torch.manual_seed(0)
    _, again = finetune(build_model("fcrn"), x, y, FinetuneConfig(steps=7, batch_size=3), seed=0)
    assert again == history  # seeded: the same batches, the same losses

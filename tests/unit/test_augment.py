"""Seeded augmentation in the training step: exact symmetries, image and mask together, jitter in bounds."""

import copy

import numpy as np
import pytest
import torch

from fsmeta.augment import Augment, augmentation
from fsmeta.config import AugmentConfig, FinetuneConfig
from fsmeta.finetune import finetune
from fsmeta.meta.reptile import InnerSettings, TaskBatch, adapt
from fsmeta.models import build_model, clone_state

GEOMETRY = AugmentConfig(contrast=0.0, brightness=0.0)
JITTER = AugmentConfig(flips=False, rot90=False, contrast=0.2, brightness=0.1)


def _batch(n=16, s=8, seed=0):
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 1, s, s)).astype(np.float32))
    return x, (x > 0.3).float()


def test_nothing_on_is_no_transform():
    assert augmentation(AugmentConfig(flips=False, rot90=False, contrast=0.0, brightness=0.0), (0,)) is None
    assert isinstance(augmentation(AugmentConfig(), (0,)), Augment)


def test_geometry_permutes_pixels_and_keeps_each_mask_on_its_image():
    x, y = _batch()
    ax, ay = augmentation(GEOMETRY, (3, 1))(5, (x, y))
    for k in range(len(x)):
        assert torch.equal(ax[k].flatten().sort().values, x[k].flatten().sort().values)  # a permutation of the crop
        assert torch.equal(ay[k], (ax[k] > 0.3).float())  # the mask moved with its image
    assert not torch.equal(ax, x)


def test_all_eight_symmetries_occur_and_are_exact():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(400, 1, 1, 1)
    (ax,) = augmentation(GEOMETRY, (0,), paired=1, masks=())(0, (x,))
    expected = set()
    for flip in (False, True):
        for turns in range(4):
            t = torch.flip(x[0], dims=(-1,)) if flip else x[0]
            expected.add(tuple(torch.rot90(t, turns, dims=(-2, -1)).flatten().tolist()))
    seen = {tuple(ax[k].flatten().tolist()) for k in range(len(ax))}
    assert seen == expected


def test_seeded_by_key_and_step():
    x, y = _batch()
    aug = augmentation(AugmentConfig(), (7, 2, 1))
    first = aug(4, (x, y))
    assert all(torch.equal(a, b) for a, b in zip(first, aug(4, (x, y))))
    assert not torch.equal(first[0], aug(5, (x, y))[0])
    assert not torch.equal(first[0], augmentation(AugmentConfig(), (7, 2, 2))(4, (x, y))[0])


def test_jitter_is_a_bounded_affine_map_of_the_image_only():
    x, y = _batch()
    ax, ay = augmentation(JITTER, (1,))(0, (x, y))
    assert torch.equal(ay, y)  # masks are never jittered
    for k in range(len(x)):
        a = np.stack([x[k].flatten().numpy(), np.ones(x[k].numel(), np.float32)], 1)
        (c, b), *_ = np.linalg.lstsq(a, ax[k].flatten().numpy(), rcond=None)
        assert 0.8 - 1e-4 <= c <= 1.2 + 1e-4 and -0.1 - 1e-4 <= b <= 0.1 + 1e-4
        np.testing.assert_allclose(ax[k].numpy(), c * x[k].numpy() + b, atol=1e-5)


def test_unpaired_tensors_get_their_own_geometry():
    x, y = _batch(n=64)
    ax, ay, an = augmentation(GEOMETRY, (2,))(0, (x, y, x.clone()))
    assert torch.equal(ay, (ax > 0.3).float())
    assert not torch.equal(ax, an)  # the unlabelled copy moved differently


def test_augmented_adapt_and_finetune_are_deterministic_and_differ_from_plain():
    rng = np.random.default_rng(0)
    arrays = [rng.uniform(-1, 1, (2, 1, 32, 32)).astype(np.float32) for _ in range(3)]
    batch = TaskBatch.from_numpy(arrays[0], (arrays[1] > 0.6).astype(np.float32), arrays[1], arrays[2], key=(0, 3, 1))
    torch.manual_seed(0)
    model = build_model("fcrn")
    theta = clone_state(model)
    plain = InnerSettings(steps=2, lr=1e-3, weight_decay=5e-4, alpha=0.01, beta=0.01)
    augmented = InnerSettings(steps=2, lr=1e-3, weight_decay=5e-4, alpha=0.01, beta=0.01, augment=AugmentConfig(meta=True))
    a, b = adapt(model, theta, batch, augmented), adapt(model, theta, batch, augmented)
    assert all(torch.equal(a.theta[k], b.theta[k]) for k in theta)
    c = adapt(model, theta, batch, plain)
    assert not torch.equal(a.theta["head.weight"], c.theta["head.weight"])

    x, y = torch.from_numpy(arrays[0].repeat(2, 0)), torch.from_numpy((arrays[1] > 0.6).astype(np.float32).repeat(2, 0))
    cfg = FinetuneConfig(epochs=2, steps=0, batch_size=2)
    on = AugmentConfig(finetune=True)
    base = build_model("unet")
    m1, h1 = finetune(copy.deepcopy(base), x, y, cfg, seed=1, augment=on)
    m2, h2 = finetune(copy.deepcopy(base), x, y, cfg, seed=1, augment=on)
    _, h3 = finetune(copy.deepcopy(base), x, y, cfg, seed=1, augment=AugmentConfig(finetune=False))
    assert h1 == h2 and h1 != h3


@pytest.mark.parametrize("bad", ["augment.contrast=1.5", "augment.brightness=-0.1"])
def test_bad_strengths_are_refused(bad):
    from fsmeta.config import load_config
    from fsmeta.errors import ConfigError

    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_config(None, [bad])

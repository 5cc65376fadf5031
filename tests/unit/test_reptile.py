import numpy as np
import pytest
import torch

from fsmeta.errors import NonFiniteLossError
from fsmeta.meta.reptile import InnerSettings, TaskBatch, adapt, meta_update
from fsmeta.models import build_model, clone_state


def _batch(seed=0, k=2, s=32):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (k, 1, s, s)).astype(np.float32)
    y = (rng.random((k, 1, s, s)) > 0.8).astype(np.float32)
    return TaskBatch.from_numpy(x, y, rng.uniform(-1, 1, x.shape).astype(np.float32), rng.uniform(-1, 1, x.shape).astype(np.float32))


SETTINGS = InnerSettings(steps=3, lr=1e-3, weight_decay=5e-4, alpha=0.01, beta=0.01)


def test_meta_update_against_hand_computed_values():
    theta = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    a = {"w": torch.tensor([3.0, 2.0]), "n": torch.tensor(7)}
    b = {"w": torch.tensor([1.0, 6.0]), "n": torch.tensor(7)}
    # mean delta = ([2, 0] + [0, 4]) / 2 = [1, 2]; ε = 0.5 → θ + [0.5, 1]
    out = meta_update(theta, [a, b], epsilon=0.5)
    assert torch.equal(out["w"], torch.tensor([1.5, 3.0]))
    assert int(out["n"]) == 7
    assert torch.equal(meta_update(theta, [a], epsilon=1.0)["w"], a["w"])  # ε = 1, one task: θ' itself


def test_adapt_is_pure_and_deterministic():
    torch.manual_seed(0)
    model = build_model("fcrn")
    theta = clone_state(model)
    r1 = adapt(model, theta, _batch(), SETTINGS)
    model.load_state_dict(clone_state(build_model("fcrn")))  # scribble over the workspace
    r2 = adapt(model, theta, _batch(), SETTINGS)
    for k in theta:
        assert torch.equal(r1.theta[k], r2.theta[k]), k
    changed = [k for k in theta if not torch.equal(theta[k], r1.theta[k])]
    assert "bottleneck.1.running_mean" in changed and "enc1.0.weight" in changed  # weights and BN stats adapt
    assert set(r1.losses) == {"loss", "bce", "er", "d"} and r1.losses["er"] > 0 and r1.losses["d"] > 0


def test_loss_terms_switch_off_with_zero_weights():
    torch.manual_seed(0)
    model = build_model("unet")
    r = adapt(model, clone_state(model), _batch(), InnerSettings(2, 1e-3, 5e-4, alpha=0.0, beta=0.0))
    assert r.losses["er"] == 0.0 and r.losses["d"] == 0.0 and r.losses["loss"] == pytest.approx(r.losses["bce"])


def test_nan_loss_stops_with_a_message_naming_the_source():
    model = build_model("fcrn")
    batch = _batch()
    batch.x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="loss is nan at inner step 0 of source synth-em"):
        adapt(model, clone_state(model), batch, SETTINGS, where="source synth-em")

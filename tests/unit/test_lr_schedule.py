"""finetune.lr_schedule: the rate every fine-tuning step runs at, by hand, through the one
training step, with held-out bands and their refit, and the configuration's check."""

import copy
import math

import pytest
import torch

from fsmeta.config import ConfigError, FinetuneConfig, changed_keys, load_config
from fsmeta.finetune import finetune, hold_out, lr_factor
from fsmeta.models import build_model, clone_state
from fsmeta.step import TrainingStep

from tests.unit.test_holdout import _support


@pytest.fixture
def rates(monkeypatch):
    """The learning rate of every Adam step taken, in order."""
    seen: list[float] = []
    original = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    return seen


def test_cosine_factor_by_hand():
    assert lr_factor("constant", 4) is None
    f = lr_factor("cosine", 4)
    # ½(1 + cos(π t/4)) for t = 0..3: 1, (2 + √2)/4, ½, (2 − √2)/4; past the end it stays at 0
    assert [f(t) for t in range(4)] == pytest.approx([1.0, (2 + math.sqrt(2)) / 4, 0.5, (2 - math.sqrt(2)) / 4])
    assert f(4) == pytest.approx(0.0) and f(9) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="'linear'"):
        lr_factor("linear", 4)


def test_training_step_runs_each_step_at_its_factor(rates):
    torch.manual_seed(0)
    model = build_model("fcrn")
    step = TrainingStep(model, lr=0.01, weight_decay=0.0, lr_factor=lambda t: 1.0 / (t + 1))
    x, y = torch.rand(2, 1, 16, 16) * 2 - 1, (torch.rand(2, 1, 16, 16) > 0.5).float()
    for _ in range(3):
        step(lambda forward, a, b: torch.nn.functional.binary_cross_entropy_with_logits(forward(a)[0], b), x, y)
    assert rates == pytest.approx([0.01, 0.005, 0.01 / 3])


def test_finetune_cosine_over_the_budget_and_constant_unchanged(rates):
    images, index, x, y = _support()
    torch.manual_seed(0)
    base = build_model("fcrn")
    cfg = FinetuneConfig(steps=4, steps_per_shot=3, batch_size=4, lr=1e-3, lr_schedule="cosine")
    cosine, _ = finetune(copy.deepcopy(base), x, y, cfg, seed=0, shots=2)  # budget max(4, 3 × 2) = 6
    assert rates == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * t / 6)) for t in range(6)])
    rates.clear()
    constant, _ = finetune(copy.deepcopy(base), x, y, FinetuneConfig(steps=6, batch_size=4, lr=1e-3), seed=0)
    assert rates == [1e-3] * 6
    # the same batches at other rates: other weights
    assert any(not torch.equal(v, constant.state_dict()[k]) for k, v in clone_state(cosine).items())


def test_holdout_refit_retraces_the_budget_schedule(rates):
    """With held-out bands the schedule spans the whole budget, so the chosen weights are those of
    a rate not yet decayed to 0; the refit on every crop runs the same first best_step rates."""
    images, index, x, y = _support()
    torch.manual_seed(0)
    base = build_model("fcrn")
    held = hold_out(images, index, 0.25, seed=1)
    held.score = lambda model, compute: (float(len(held.curve) == 1), 0.5)  # best at the second validation: step 4
    cfg = FinetuneConfig(steps=8, batch_size=4, val_every=2, lr=1e-3, lr_schedule="cosine", refit=True)
    finetune(copy.deepcopy(base), x, y, cfg, seed=0, holdout=held)
    assert held.best_step == 4
    schedule = [1e-3 * 0.5 * (1 + math.cos(math.pi * t / 8)) for t in range(8)]
    assert rates == pytest.approx(schedule + schedule[:4])


def test_config_names_a_bad_schedule_and_an_old_run_compares_as_constant():
    with pytest.raises(ConfigError, match="finetune.lr_schedule='linear' is not one of constant, cosine"):
        load_config(None, ["finetune.lr_schedule=linear"])
    now = load_config(None, []).flat()
    saved = {k: v for k, v in now.items() if k != "finetune.lr_schedule"}  # a run saved before the key
    assert changed_keys(saved, now) == []
    assert changed_keys(saved, load_config(None, ["finetune.lr_schedule=cosine"]).flat()) == ["finetune.lr_schedule"]

"""Test-time augmentation over flips and 90° turns (fsmeta.models.DihedralTTA)."""

import numpy as np
import pytest
import torch
from PIL import Image

from fsmeta.checkpoint import save_checkpoint
from fsmeta.cli import main
from fsmeta.models import DihedralTTA, build_model


def _model(seed=0):
    torch.manual_seed(seed)
    model = build_model("fcrn").eval()
    for m in model.modules():  # running statistics away from (0, 1), as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


@torch.no_grad()
def test_the_group_mean_turns_and_flips_with_its_input():
    """Averaged over the whole group, the prediction of a turned (or flipped) image is the turned
    prediction: wrong undo steps, or a transform missing from the group, break this."""
    model = _model()
    tta = DihedralTTA(model)
    x = torch.rand(1, 1, 32, 48) * 2 - 1  # not square: a turn swaps the sides
    p = torch.sigmoid(tta(x))
    assert p.shape == x.shape
    assert torch.allclose(torch.sigmoid(tta(torch.rot90(x, 1, (2, 3)))), torch.rot90(p, 1, (2, 3)), atol=1e-5)
    assert torch.allclose(torch.sigmoid(tta(x.flip(2))), p.flip(2), atol=1e-5)
    plain = torch.sigmoid(model(x))
    assert not torch.allclose(torch.sigmoid(model(torch.rot90(x, 1, (2, 3)))), torch.rot90(plain, 1, (2, 3)), atol=1e-3)
    # and it is the mean of the eight predictions, each turned back
    manual = sum(torch.rot90(torch.sigmoid(model(torch.rot90(x, k, (2, 3)))), -k, (2, 3))
                 + torch.rot90(torch.sigmoid(model(torch.rot90(x, k, (2, 3)).flip(3))).flip(3), -k, (2, 3))
                 for k in range(4)) / 8
    assert torch.allclose(p, manual, atol=1e-5)


@torch.no_grad()
def test_the_mirror_mean_flips_with_its_input_but_does_not_turn():
    """MIRRORS (nnU-Net's and Cellpose's four mirrorings) is a group of its own: flips of the input
    flip the mean; it is the mean of those four passes; a quarter turn is not among them."""
    from fsmeta.models.tta import MIRRORS

    model = _model(3)
    tta = DihedralTTA(model, MIRRORS)
    x = torch.rand(1, 1, 32, 48) * 2 - 1
    p = torch.sigmoid(tta(x))
    assert torch.allclose(torch.sigmoid(tta(x.flip(2))), p.flip(2), atol=1e-5)
    assert torch.allclose(torch.sigmoid(tta(x.flip(3))), p.flip(3), atol=1e-5)
    manual = sum(torch.sigmoid(model(x.flip(d) if d else x)).flip(d) if d else torch.sigmoid(model(x))
                 for d in [(), (2,), (3,), (2, 3)]) / 4
    assert torch.allclose(p, manual, atol=1e-5)
    turned = torch.sigmoid(tta(torch.rot90(x, 1, (2, 3))))
    assert not torch.allclose(turned, torch.rot90(p, 1, (2, 3)), atol=1e-3)


def test_predict_tta_segments_the_group_mean(tmp_path):
    model = _model(1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = save_checkpoint(tmp_path / "w.safetensors", state, {"arch": "fcrn", "bn_affine": False, "kind": "scratch"})
    image = (np.random.default_rng(5).random((64, 64)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    base = ["predict", "--weights", str(ckpt), "--input", str(tmp_path / "a.png"), "--tile", "64", "--overlap", "16",
            "--threads", "1"]
    with torch.no_grad():
        x = torch.from_numpy(image.astype(np.float32) / 255 * 2 - 1)[None, None]
        p = torch.sigmoid(DihedralTTA(model)(x))[0, 0].numpy()
    threshold = float(np.median(p))
    assert main([*base, "--output", str(tmp_path / "tta"), "--tta", "--threshold", str(threshold)]) == 0
    assert main([*base, "--output", str(tmp_path / "one"), "--threshold", str(threshold)]) == 0
    tta = np.asarray(Image.open(tmp_path / "tta" / "masks" / "a.png")) > 0
    one = np.asarray(Image.open(tmp_path / "one" / "masks" / "a.png")) > 0
    # predict runs under bf16 where the CPU has it: agreement with the fp32 group mean up to rounding
    assert (tta == (p >= threshold)).mean() > 0.97
    assert (tta != one).mean() > 0.03
    assert pytest.approx(tta.mean(), abs=0.05) == 0.5


def test_predict_follows_the_checkpoints_recorded_predictor(tmp_path):
    """A fine-tune with eval.tta records it (its threshold was chosen on the group mean): predict uses
    the mean unless --no-tta; a checkpoint without the record predicts one pass unless --tta."""
    model = _model(2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    image = (np.random.default_rng(6).random((64, 64)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    with torch.no_grad():
        x = torch.from_numpy(image.astype(np.float32) / 255 * 2 - 1)[None, None]
        threshold = float(np.median(torch.sigmoid(DihedralTTA(model)(x))[0, 0].numpy()))
    masks = {}
    for name, meta, flag in [("plain", {}, []), ("plain-tta", {}, ["--tta"]), ("rec", {"tta": True}, []),
                             ("rec-no", {"tta": True}, ["--no-tta"])]:
        ckpt = save_checkpoint(tmp_path / f"{name}.safetensors", state, {"arch": "fcrn", "bn_affine": False, "kind": "scratch", **meta})
        assert main(["predict", "--weights", str(ckpt), "--input", str(tmp_path / "a.png"), "--tile", "64", "--overlap", "16",
                     "--threads", "1", "--threshold", str(threshold), "--output", str(tmp_path / name), *flag]) == 0
        masks[name] = np.asarray(Image.open(tmp_path / name / "masks" / "a.png")) > 0
    assert (masks["plain"] != masks["plain-tta"]).mean() > 0.03  # the two predictors differ here
    assert np.array_equal(masks["rec"], masks["plain-tta"])
    assert np.array_equal(masks["rec-no"], masks["plain"])

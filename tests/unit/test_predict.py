"""`fsmeta predict`: tiled inference equals a whole-image pass, cells from masks, and the files written."""

import csv

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from fsmeta.checkpoint import model_from_checkpoint, save_checkpoint
from fsmeta.compute import prepare_model
from fsmeta.config import ComputeConfig
from fsmeta.cli import main
from fsmeta.models import ARCHITECTURES, build_model
from fsmeta.predict import (
    RECEPTIVE_MARGIN, PredictSettings, instance_labels, predict_files, predict_tiled, predict_whole, tile_layout,
)
from fsmeta.errors import FsmetaError


def _model(arch="fcrn", seed=0):
    torch.manual_seed(seed)
    model = build_model(arch).eval()
    for m in model.modules():  # running statistics away from (0, 1), as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture
def checkpoint(tmp_path):
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return save_checkpoint(tmp_path / "w.safetensors", state, {"arch": "fcrn", "bn_affine": False, "kind": "scratch"})


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_receptive_field_is_inside_the_margin(arch):
    """Changing one input pixel changes no output farther than RECEPTIVE_MARGIN away."""
    model = _model(arch)
    x = torch.randn(1, 1, 128, 128)
    with torch.no_grad():
        base = model(x)[0, 0]
        reach = 0
        for p in (60, 63, 64, 67):
            x2 = x.clone()
            x2[0, 0, p, p] += 10.0
            ys, xs = torch.nonzero(model(x2)[0, 0] != base, as_tuple=True)
            reach = max(reach, int((ys - p).abs().max()), int((xs - p).abs().max()))
    assert 0 < reach < RECEPTIVE_MARGIN


def test_tile_layout_covers_aligns_and_balances():
    for length in (50, 128, 129, 300, 520, 696, 1000, 2048, 4097):
        for tile, overlap in ((128, 64), (512, 64), (96, 32)):
            starts, t = tile_layout(length, tile, overlap, 8)
            assert starts[0] == 0 and all(s % 8 == 0 for s in starts) and t <= max(tile, length)
            assert length - 8 < starts[-1] + t  # the last tile runs to the end, at most 7 px longer
            assert all(b - a <= t - overlap for a, b in zip(starts, starts[1:]))  # every seam keeps the overlap
    assert tile_layout(2048, 512, 64, 8) == ([0, 392, 792, 1184, 1584], 464)  # five even tiles, not 5 × 512


FP32 = ComputeConfig(amp="off", channels_last="off")
BF16 = ComputeConfig(amp="bf16", channels_last="on")  # autocast on any CPU (emulated where bf16 is not native)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_tiled_equals_whole_image(arch):
    """With overlap ≥ 2 × RECEPTIVE_MARGIN, stitched tiles reproduce the whole-image pass.

    Measured: max |Δp| = 0 to 1.2e-7 (float rounding of different convolution shapes);
    the bound asserted is 1e-5, and the masks are identical."""
    model = _model(arch)
    image = np.random.default_rng(0).random((180, 251)).astype(np.float32)
    whole = predict_whole(model, image, compute=FP32)
    tiled = predict_tiled(model, image, tile=128, overlap=64, batch=3, compute=FP32)
    assert np.abs(tiled - whole).max() < 1e-5
    assert np.array_equal(tiled >= 0.5, whole >= 0.5)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_tiled_equals_whole_image_in_bf16(arch):
    """The same under bf16 autocast + channels_last (the default on CPUs with native bf16).

    Measured on AVX-512 BF16 (3 seeds × 2 archs): tiled vs whole max |Δp| 0 to 6e-8, masks
    identical; bf16 vs fp32 max |Δp| 6e-5 to 2.6e-4. Held: tiled vs whole < 1e-3 with at
    most 0.1% of pixels flipping at 0.5 (other CPUs' bf16 kernels may round tiles differently),
    and within 2e-3 of the fp32 pass."""
    model = prepare_model(_model(arch), torch.device("cpu"), BF16)
    image = np.random.default_rng(0).random((180, 251)).astype(np.float32)
    whole = predict_whole(model, image, compute=BF16)
    tiled = predict_tiled(model, image, tile=128, overlap=64, batch=3, compute=BF16)
    assert np.abs(tiled - whole).max() < 1e-3
    assert ((tiled >= 0.5) != (whole >= 0.5)).mean() <= 1e-3
    assert np.abs(whole - predict_whole(_model(arch), image, compute=FP32)).max() < 2e-3


def test_small_overlap_is_close_but_not_exact():
    """Below 2 × margin the tile borders leak in a little; documented, measured here (FCRN: ~2e-4 at 16 px)."""
    model = _model()
    image = np.random.default_rng(1).random((160, 200)).astype(np.float32)
    diff = np.abs(predict_tiled(model, image, tile=64, overlap=16) - predict_whole(model, image)).max()
    assert 0 < diff < 0.05


def test_image_smaller_than_a_tile_runs_whole():
    model = _model()
    image = (np.random.default_rng(2).random((40, 50)) * 255).astype(np.uint8)
    assert np.array_equal(predict_tiled(model, image, tile=512), predict_whole(model, image))


def test_watershed_splits_touching_nuclei_and_min_size_drops_specks():
    yy, xx = np.mgrid[:60, :80]
    mask = ((yy - 30) ** 2 + (xx - 25) ** 2 <= 144) | ((yy - 30) ** 2 + (xx - 47) ** 2 <= 144)
    mask[2:4, 2:4] = True  # a 4-pixel speck
    assert instance_labels(mask).max() == 2  # the touching pair is one component
    split = instance_labels(mask, watershed=True, min_distance=5)
    assert split.max() == 3
    kept = instance_labels(mask, watershed=True, min_size=10)
    assert kept.max() == 2 and kept[2, 2] == 0 and set(np.unique(kept)) == {0, 1, 2}


def test_predict_writes_masks_labels_counts_overlays(tmp_path, checkpoint):
    model, _ = model_from_checkpoint(checkpoint)
    rng = np.random.default_rng(3)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray((rng.random((70, 90)) * 255).astype(np.uint8)).save(inputs / "a.png")
    tifffile.imwrite(inputs / "b.tif", (rng.random((150, 130)) * 4000).astype(np.uint16))
    tifffile.imwrite(inputs / "stack.tif", (rng.random((3, 40, 48)) * 255).astype(np.uint8), photometric="minisblack")
    rgb = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(inputs / "c.png")
    out = tmp_path / "out"
    rows = predict_files(model, sorted(inputs.iterdir()), out, PredictSettings(tile=64, overlap=16, threshold=0.5), progress=False)
    assert [r.name for r in rows] == ["a.png", "b.tif", "c.png", "stack.tif#0", "stack.tif#1", "stack.tif#2"]
    mask_a = np.asarray(Image.open(out / "masks" / "a.png"))
    assert mask_a.shape == (70, 90) and set(np.unique(mask_a)) <= {0, 255}
    assert tifffile.imread(out / "masks" / "b.tif").shape == (150, 130)  # TIFF in, TIFF out
    assert tifffile.imread(out / "masks" / "stack.tif").shape == (3, 40, 48)
    labels_a = np.asarray(Image.open(out / "labels" / "a.png"))
    assert labels_a.max() == rows[0].cells and ((labels_a > 0) == (mask_a > 0)).all()
    assert tifffile.imread(out / "labels" / "b.tif").max() == rows[1].cells
    assert np.asarray(Image.open(out / "overlays" / "c.png")).shape == (64, 64, 3)
    assert (out / "overlays" / "stack-p001.png").is_file()
    with open(out / "counts.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["image"] for r in table] == [r.name for r in rows]
    assert int(table[0]["cells"]) == rows[0].cells and float(table[0]["mean_area_px"]) >= 0
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left


def test_predict_cli_and_its_errors(tmp_path, checkpoint, capsys):
    Image.fromarray(np.full((40, 40), 100, np.uint8)).save(tmp_path / "one.png")
    out = tmp_path / "out"
    assert main(["predict", "--weights", str(checkpoint), "--input", str(tmp_path / "one.png"), "--output", str(out)]) == 0
    assert "1 image(s)" in capsys.readouterr().out and (out / "counts.csv").is_file()
    code = main(["predict", "--weights", str(tmp_path / "none.safetensors"), "--input", str(tmp_path / "one.png"), "--output", str(out)])
    assert code == 2 and "weights" in capsys.readouterr().err
    code = main(["predict", "--weights", str(checkpoint), "--input", str(tmp_path / "nowhere"), "--output", str(out)])
    assert code == 2 and "nowhere does not exist" in capsys.readouterr().err
    code = main(["predict", "--weights", str(checkpoint), "--input", str(tmp_path / "one.png"), "--output", str(out), "--overlap", "300"])
    assert code == 2 and "--overlap 300 must be" in capsys.readouterr().err
    with pytest.raises(FsmetaError, match="strictly between 0 and 1"):
        PredictSettings(threshold=1.0).check()


def test_predict_uses_the_threshold_the_fine_tune_recorded(tmp_path, capsys):
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    image = (np.random.default_rng(3).random((64, 64)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    prob = predict_whole(model, image)
    strict = float(np.quantile(prob, 0.9))  # 10% of the pixels are at or above it (0.5 is far from there)
    recorded = save_checkpoint(tmp_path / "t.safetensors", state, {"arch": "fcrn", "bn_affine": False, "kind": "scratch",
                                                                   "threshold": strict})
    assert main(["predict", "--weights", str(recorded), "--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "rec"),
                 "--tile", "64", "--overlap", "16"]) == 0
    assert main(["predict", "--weights", str(recorded), "--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "half"),
                 "--tile", "64", "--overlap", "16", "--threshold", "0.5"]) == 0
    rec = np.asarray(Image.open(tmp_path / "rec" / "masks" / "a.png")) > 0
    half = np.asarray(Image.open(tmp_path / "half" / "masks" / "a.png")) > 0
    assert abs(rec.mean() - 0.1) < 0.02  # the recorded threshold's pixels (tiling changes p by < 1e-3)
    assert abs(half.mean() - (prob >= 0.5).mean()) < 0.02 and abs(rec.mean() - half.mean()) > 0.05


def test_predict_drops_the_objects_under_the_size_the_fine_tune_recorded(tmp_path):
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    image = (np.random.default_rng(3).random((64, 64)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    prob = predict_whole(model, image)
    threshold = float(np.quantile(prob, 0.5))
    recorded = save_checkpoint(tmp_path / "t.safetensors", state, {"arch": "fcrn", "bn_affine": False, "kind": "scratch",
                                                                   "threshold": threshold, "min_size": 64 * 64 + 1})
    base = ["predict", "--weights", str(recorded), "--input", str(tmp_path / "a.png"), "--tile", "64", "--overlap", "16"]
    assert main([*base, "--output", str(tmp_path / "rec")]) == 0
    assert main([*base, "--output", str(tmp_path / "all"), "--min-size", "0"]) == 0
    rec = np.asarray(Image.open(tmp_path / "rec" / "masks" / "a.png")) > 0
    kept = np.asarray(Image.open(tmp_path / "all" / "masks" / "a.png")) > 0
    assert rec.sum() == 0 and abs(kept.mean() - 0.5) < 0.05  # no object is as large as the image; --min-size 0 keeps all


def test_weights_from_an_mlflow_run(tmp_path, checkpoint, capsys):
    from fsmeta.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "predict-test")
    with tracker.run("finetune") as run_id:
        tracker.log_artifact(run_id, checkpoint, "checkpoints")
    Image.fromarray(np.full((40, 40), 100, np.uint8)).save(tmp_path / "one.png")
    args = ["predict", "--weights", f"runs:/{run_id}/checkpoints/w.safetensors", "--tracking-uri", uri,
            "--input", str(tmp_path / "one.png"), "--output", str(tmp_path / "out")]
    assert main(args) == 0 and (tmp_path / "out" / "masks" / "one.png").is_file()
    capsys.readouterr()
    args[2] = "runs:/0123456789abcdef/checkpoints/w.safetensors"
    assert main(args) == 2 and "cannot download runs:/0123456789abcdef" in capsys.readouterr().err


def test_inference_folds_batch_norm_only_under_bf16():
    """fp32 predicts with the model itself (the exact path); bf16 with a folded copy, as close to
    the unfolded bf16 prediction as bf16 rounding allows (measured 5e-5 vs fp32 on a 2048² image)."""
    from fsmeta.compute import inference_model

    model = _model()
    assert inference_model(model, FP32) is model
    folded = inference_model(model, BF16)
    assert folded is not model and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    image = np.random.default_rng(4).random((96, 120)).astype(np.float32)
    unfolded = predict_whole(prepare_model(_model(), torch.device("cpu"), BF16), image, compute=BF16)
    assert np.abs(predict_whole(folded, image, compute=BF16) - unfolded).max() < 2e-3

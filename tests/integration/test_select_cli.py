"""``fsmeta select`` as a user meets it: a folder of their own images (or a prepared
data set) in, ranking.csv + to_annotate/ + contact_sheet.png out; clear errors."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile
from PIL import Image

from fsmeta.checkpoint import save_checkpoint
from fsmeta.cli import main
from fsmeta.data import synth
from fsmeta.models import build_model
from tests.conftest import TINY

FAST = ["--set", "select.pretext_epochs=1", "--set", "data.crop_size=64", "--set", "data.finetune_stride={default: 32}",
        "--threads", "2"]


@pytest.fixture
def user_folder(tmp_path):
    """Four 96×96 images as a lab would have them: 8-bit PNGs, a 16-bit TIFF, an RGB PNG."""
    folder = tmp_path / "my images"
    folder.mkdir()
    imgs, _ = synth.generate("synth-he", 4, 96, seed=0)
    Image.fromarray((imgs[0] * 255).astype(np.uint8)).save(folder / "a0.png")
    Image.fromarray((imgs[1] * 255).astype(np.uint8)).save(folder / "a1.png")
    tifffile.imwrite(folder / "b16.tif", (imgs[2] * 60000).astype(np.uint16))
    Image.fromarray(np.stack([(imgs[3] * 255).astype(np.uint8)] * 3, -1)).save(folder / "c_rgb.png")
    return folder


@pytest.fixture
def weights(tmp_path):
    import torch

    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "w.safetensors", build_model("fcrn").state_dict(), {"arch": "fcrn", "bn_affine": False, "kind": "meta"})


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_select_whole_images_from_a_folder(tmp_path, capsys, user_folder, weights):
    out = tmp_path / "sel"
    code, stdout, err = _run(capsys, "select", "--weights", weights, "--target", user_folder, "--budget", 2,
                             "--method", "consistency", "--unit", "image", "--patch-size", 64, "--out", out, *FAST)
    assert code == 0, err
    rows = _rows(out / "ranking.csv")
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    assert sorted(r["item"] for r in rows) == ["a0", "a1", "b16", "c_rgb"]
    assert [r["selected"] for r in rows] == ["1", "1", "0", "0"]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    chosen = sorted(p.name for p in (out / "to_annotate").iterdir())
    assert len(chosen) == 2
    for name in chosen:  # the original files, byte for byte, ready for an annotation tool
        assert (out / "to_annotate" / name).read_bytes() == (user_folder / name).read_bytes()
    assert (out / "contact_sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.rglob(".*")]  # no temporary leftovers
    assert "selected 2 of 4 image(s)" in stdout


def test_select_patches_keeps_bit_depth_and_colour(tmp_path, capsys, user_folder, weights):
    out = tmp_path / "sel"
    code, _, err = _run(capsys, "select", "--weights", weights, "--target", user_folder, "--budget", 16,
                        "--method", "entropy", "--unit", "patch", "--patch-size", 64, "--patch-stride", 32, "--out", out, *FAST)
    assert code == 0, err
    rows = _rows(out / "ranking.csv")
    assert len(rows) == 16 and all(r["selected"] == "1" for r in rows)  # 4 images × 4 patches, all selected
    files = {p.name: p for p in (out / "to_annotate").iterdir()}
    assert len(files) == 16
    tif = tifffile.imread(files["b16_y32_x0.tif"])
    assert tif.dtype == np.uint16 and tif.shape == (64, 64)
    np.testing.assert_array_equal(tif, tifffile.imread(user_folder / "b16.tif")[32:96, 0:64])
    rgb = np.asarray(Image.open(files["c_rgb_y0_x32.png"]))
    assert rgb.shape == (64, 64, 3)
    # A second run replaces to_annotate/ whole: nothing of the first run remains.
    code, _, err = _run(capsys, "select", "--weights", weights, "--target", user_folder, "--budget", 1,
                        "--method", "random", "--unit", "image", "--out", out, *FAST)
    assert code == 0, err
    assert len(list((out / "to_annotate").iterdir())) == 1


def test_select_from_a_prepared_data_set(tmp_path, capsys, weights):
    args = []
    for item in TINY:
        args += ["--set", item]
    out = tmp_path / "sel"
    code, _, err = _run(capsys, "select", "--weights", weights, "--target", "synth-he", "--data-root", tmp_path / "data",
                        *args, "--budget", 3, "--method", "mc-dropout", "--unit", "image", "--gamma", "auto",
                        "--set", "select.mc_passes=2", "--patch-size", 64, "--out", out, *FAST)
    assert code == 0, err
    assert len(_rows(out / "ranking.csv")) == 8
    assert sorted(p.suffix for p in (out / "to_annotate").iterdir()) == [".png"] * 3


def test_select_errors_are_clear(tmp_path, capsys, user_folder, weights):
    base = ["select", "--weights", weights, "--method", "random", "--out", tmp_path / "o", *FAST]
    code, _, err = _run(capsys, *base, "--target", user_folder, "--budget", 9)
    assert code == 2 and "budget of 9 image(s) is larger than the pool of 4 image(s)" in err and "Traceback" not in err
    code, _, err = _run(capsys, *base, "--target", user_folder, "--budget", 99, "--unit", "patch", "--patch-size", 64)
    assert code == 2 and "budget of 99 patches is larger than the 4 candidate patches" in err
    code, _, err = _run(capsys, *base, "--target", tmp_path / "nowhere", "--budget", 1)
    assert code == 2 and "nowhere does not exist" in err
    (user_folder / "notes.txt").write_text("hello")
    code, _, err = _run(capsys, *base, "--target", user_folder, "--budget", 1)
    assert code == 2 and "notes.txt" in err
    code, _, err = _run(capsys, *base, "--target", user_folder, "--budget", 1, "--gamma", "bright")
    assert code == 2 and "--gamma must be 'auto' or a number" in err
    assert not (tmp_path / "o" / "ranking.csv").exists()  # nothing half-written


def test_select_then_finetune_the_pretext_model(tmp_path, capsys, user_folder, weights):
    """The 2023 workflow for a user: select with θ′ (kept as OUT/pretext.safetensors), annotate, fine-tune θ′;
    the ranking is the one select_support computes with its own pretext, and a fine-tuned model is refused."""
    import json

    from fsmeta.checkpoint import load_checkpoint, model_from_checkpoint
    from fsmeta.config import load_config
    from fsmeta.select import select_support
    from fsmeta.select.outputs import load_target

    out = tmp_path / "sel"
    code, stdout, err = _run(capsys, "select", "--weights", weights, "--target", user_folder, "--budget", 2,
                             "--method", "entropy", "--unit", "image", "--patch-size", 64, "--out", out, *FAST)
    assert code == 0, err
    _, meta = load_checkpoint(out / "pretext.safetensors")
    assert meta["kind"] == "pretext" and meta["bn_affine"] is True and meta["pretraining"] == "meta"
    assert meta["gamma"] == load_config().select.lookup("gamma", "default") and meta["seed"] == 0
    assert f"--weights {out / 'pretext.safetensors'}" in stdout
    # the saved θ′ is the model the ranking came from: select_support's own pretext gives the same scores
    cfg = load_config(None, ["select.pretext_epochs=1", "data.crop_size=64", "data.finetune_stride={default: 32}",
                             "select.patch_size=64", "select.patch_stride=64"])
    target = load_target(str(user_folder), cfg)
    again = select_support(model_from_checkpoint(weights)[0], target.images, range(4), 2, "entropy", "image", cfg, 0)
    rows = _rows(out / "ranking.csv")
    assert [r["item"] for r in rows] == [target.images.ids[it.image] for it in again.ranking]
    assert [float(r["score"]) for r in rows] == pytest.approx([it.score for it in again.ranking], rel=1e-6)
    saved = select_support(model_from_checkpoint(out / "pretext.safetensors")[0], target.images, range(4), 2, "entropy",
                           "image", cfg, 0, run_pretext=False)
    assert [it.score for it in saved.ranking] == pytest.approx([it.score for it in again.ranking], rel=1e-6)

    # annotate the selected images (the synthetic truth), then fine-tune θ′ on them
    _, masks = synth.generate("synth-he", 4, 96, seed=0)
    names = {"a0": 0, "a1": 1, "b16": 2, "c_rgb": 3}
    (tmp_path / "masks").mkdir()
    for p in (out / "to_annotate").iterdir():
        Image.fromarray((masks[names[p.stem]] > 0).astype(np.uint8) * 255).save(tmp_path / "masks" / f"{p.stem}.png")
    sets = [a for item in TINY for a in ("--set", item)]
    code, stdout, err = _run(capsys, "finetune", *sets, "--weights", out / "pretext.safetensors", "--support-images",
                             out / "to_annotate", "--support-masks", tmp_path / "masks", "--out", tmp_path / "mine.safetensors")
    assert code == 0, err
    assert "fine-tuned on 2 annotated image(s)" in stdout
    # The fine-tuned model names the pre-training it descends from and that it started from θ′.
    mine = json.loads((tmp_path / "mine.json").read_text())
    assert mine["kind"] == "finetuned" and mine["pretraining"] == "meta" and mine["base_kind"] == "pretext"
    code, _, err = _run(capsys, "finetune", *sets, "--weights", tmp_path / "mine.safetensors", "--support-images",
                        out / "to_annotate", "--support-masks", tmp_path / "masks", "--out", tmp_path / "twice.safetensors")
    assert code == 2 and "mine.safetensors is already fine-tuned" in err


def test_ranking_reports_predicted_foreground_and_warns_when_the_selection_is_background(
        tmp_path, capsys, user_folder, weights, monkeypatch):
    """ranking.csv carries θ′'s predicted foreground per item; a selection far poorer in it than the pool
    (what consistency did on TNBC and EM) gets a warning. The model's prediction is replaced by a known map."""
    import fsmeta.predict

    out = tmp_path / "sel"
    base = ["select", "--weights", weights, "--target", user_folder, "--budget", 1, "--method", "random",
            "--unit", "image", "--out", out, *FAST]
    seen = {}

    def fake(model, image, **kw):  # foreground exactly in the images listed in `seen`
        key = round(float(image.mean()), 6)
        return np.full(image.shape, 1.0 if seen.get(key) else 0.0, np.float32)

    monkeypatch.setattr(fsmeta.predict, "predict_tiled", fake)
    from fsmeta.select.outputs import load_target
    from fsmeta.config import load_config

    images = load_target(str(user_folder), load_config()).images
    means = {images.ids[i]: round(float(images.image(i).mean()), 6) for i in range(len(images))}
    code, _, err = _run(capsys, *base)
    assert code == 0, err
    chosen = [r["item"] for r in _rows(out / "ranking.csv") if r["selected"] == "1"]
    assert len(chosen) == 1 and [r["predicted_foreground"] for r in _rows(out / "ranking.csv")] == ["0.0000"] * 4

    seen.update({means[chosen[0]]: True})  # the model sees foreground in the selected image only: 100% vs 25%
    code, stdout, err = _run(capsys, *base)
    assert code == 0, err
    assert {r["item"]: r["predicted_foreground"] for r in _rows(out / "ranking.csv")} == {
        k: ("1.0000" if k == chosen[0] else "0.0000") for k in means}
    assert "foreground in 100.0% of the selected pixels (all candidates: 25.0%)" in stdout and "warning" not in err

    seen.clear()
    seen.update({means[k]: True for k in means if k != chosen[0]})  # everywhere but the selection: 0% vs 75%
    code, stdout, err = _run(capsys, *base)
    assert code == 0, err
    assert "foreground in 0.0% of the selected pixels (all candidates: 75.0%)" in stdout
    assert "warning: the selection is mostly what the model sees as background" in err


def test_method_defaults_to_the_configured_one(tmp_path, capsys, user_folder, weights):
    """Without --method, select.method decides (typiclust built in; a config or --set may change it)."""
    from pathlib import Path

    from fsmeta.config import SelectConfig, load_config

    paper = Path(__file__).resolve().parents[2] / "configs" / "paper.yaml"
    assert SelectConfig.method == "typiclust" and load_config(paper).select.method == "consistency"
    code, stdout, err = _run(capsys, "select", "--weights", weights, "--target", user_folder, "--budget", 1,
                             "--unit", "image", "--out", tmp_path / "sel", *FAST, "--set", "select.method=random")
    assert code == 0, err
    assert stdout.startswith("random: selected 1 of 4 image(s)") and not (tmp_path / "sel" / "pretext.safetensors").exists()

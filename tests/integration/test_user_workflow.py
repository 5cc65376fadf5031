"""A lab's workflow from the user guide, through the command line only: import a folder of
annotated images, fine-tune a pre-trained checkpoint on five of them, predict the rest."""

import csv
import json
import re
import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image

from fsmeta.cli import main
from fsmeta.data import synth
from fsmeta.data.registry import load_dataset
from fsmeta.train import scratch_checkpoint
from tests.conftest import TINY


def _lab_folder(root, n=8, size=96):
    """Annotated images as a lab would have them: 8-bit PNG and 16-bit TIFF images, masks named
    ``<image>_mask.png`` (binary) or ``<image>_label.tif`` (instance labels)."""
    from scipy import ndimage

    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i in range(n):
        image, mask = synth.generate_pair("synth-nuclei", np.random.default_rng([7, i]), size)
        if i % 2:
            tifffile.imwrite(images / f"well{i:02d}.tif", (image * 40000 + 1000).astype(np.uint16))
            labels, _ = ndimage.label(mask)
            tifffile.imwrite(masks / f"well{i:02d}_label.tif", labels.astype(np.uint16))
        else:
            Image.fromarray((image * 255).astype(np.uint8)).save(images / f"well{i:02d}.png")
            Image.fromarray(mask * 255).save(masks / f"well{i:02d}_mask.png")
    return images, masks


def _first_five(images, masks, root):
    """The first five image/mask pairs of a lab folder copied to ``root``/images and ``root``/masks."""
    support_i, support_m = root / "images", root / "masks"
    support_i.mkdir(parents=True)
    support_m.mkdir(parents=True)
    for p in sorted(images.iterdir())[:5]:
        shutil.copy(p, support_i / p.name)
    for p in sorted(masks.iterdir())[:5]:
        shutil.copy(p, support_m / p.name)
    return support_i, support_m


def test_import_finetune_predict(tmp_path, tiny_config, capsys):
    images, masks = _lab_folder(tmp_path / "lab")
    root = tmp_path / "data"

    # 1. import: the folder becomes a data set usable as a target or source
    assert main(["data", "import", "mylab", "--images", str(images), "--masks", str(masks), "--data-root", str(root)]) == 0
    assert "imported 8 image/mask pairs (float32)" in capsys.readouterr().out
    assert len(load_dataset("mylab", tiny_config("data.target=mylab", "data.sources=[synth-em]"))) == 8

    # 2. fine-tune a pre-trained checkpoint on five annotated images, straight from folders
    pretrained = scratch_checkpoint(tiny_config(), tmp_path / "pre")
    support_i, support_m = _first_five(images, masks, tmp_path / "support")
    sets = [a for item in TINY for a in ("--set", item)]
    code = main(["finetune", *sets, "--weights", str(pretrained), "--support-images", str(support_i),
                 "--support-masks", str(support_m), "--out", str(tmp_path / "mine.safetensors")])
    out = capsys.readouterr().out
    assert code == 0 and "fine-tuned on 5 annotated image(s)" in out and "crops of 64×64" in out
    meta = json.loads((tmp_path / "mine.json").read_text())
    assert meta["bn_affine"] is True and meta["shots"] == 5 and meta["support"] == [f"well{i:02d}" for i in range(5)]

    # 3. predict the other three
    rest = tmp_path / "rest"
    rest.mkdir()
    for p in sorted(images.iterdir())[5:]:
        shutil.copy(p, rest / p.name)
    result = tmp_path / "result"
    code = main(["predict", "--weights", str(tmp_path / "mine.safetensors"), "--input", str(rest), "--output", str(result),
                 "--tile", "64", "--overlap", "16", "--watershed"])
    assert code == 0 and "3 image(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (result / "masks").iterdir()) == ["well05.tif", "well06.png", "well07.tif"]
    assert sorted(p.name for p in (result / "labels").iterdir()) == ["well05.tif", "well06.png", "well07.tif"]
    assert sorted(p.name for p in (result / "overlays").iterdir()) == ["well05.png", "well06.png", "well07.png"]
    mask = tifffile.imread(result / "masks" / "well05.tif")
    labels = tifffile.imread(result / "labels" / "well05.tif")
    assert mask.shape == labels.shape == (96, 96) and ((labels > 0) == (mask > 0)).all()
    with open(result / "counts.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == ["well05.tif", "well06.png", "well07.tif"]
    assert int(rows[0]["cells"]) == labels.max()

    # 4. the predicted masks import back as a data set (e.g. after a person corrects them)
    assert main(["data", "import", "corrected", "--images", str(rest), "--masks", str(result / "masks"), "--data-root", str(root)]) == 0


def test_finetune_cuts_folders_at_finetune_crop_size(tmp_path, tiny_config, capsys):
    images, masks = _lab_folder(tmp_path / "lab")
    pretrained = scratch_checkpoint(tiny_config(), tmp_path / "pre")
    sets = [a for item in [*TINY, "finetune.crop_size=32", "data.finetune_stride={default: 32}"] for a in ("--set", item)]
    code = main(["finetune", *sets, "--weights", str(pretrained), "--support-images", str(images),
                 "--support-masks", str(masks), "--out", str(tmp_path / "ft.safetensors")])
    out = capsys.readouterr().out
    assert code == 0 and "crops of 32×32" in out, out
    assert json.loads((tmp_path / "ft.json").read_text())["crop_size"] == 32


def test_finetune_folders_hold_out_bands_and_keep_their_threshold(tmp_path, tiny_config, capsys):
    """The built-in default (finetune.holdout) on a lab's folders: the bands choose the step and the
    threshold, the command says which, and the checkpoint carries that threshold to predict."""
    images, masks = _lab_folder(tmp_path / "lab")
    pretrained = scratch_checkpoint(tiny_config(), tmp_path / "pre")
    tiny = [o for o in TINY if not o.startswith("finetune.epochs=")]  # a step budget: epochs are refused beside it
    sets = [a for item in [*tiny, "finetune.crop_size=32", "data.finetune_stride={default: 16}", "finetune.holdout=0.25",
                           "finetune.steps=6", "finetune.steps_per_shot=1", "finetune.val_every=7"] for a in ("--set", item)]
    code = main(["finetune", *sets, "--weights", str(pretrained), "--support-images", str(images),
                 "--support-masks", str(masks), "--out", str(tmp_path / "ft.safetensors")])
    out = capsys.readouterr().out
    found = re.search(r"held-out bands chose step (\d+) \(IoU [0-9.]+\) and threshold ([0-9.]+)", out)
    assert code == 0 and found, out
    assert int(found.group(1)) in (7, 8)  # 8 images at one step each: a budget of 8 (6 alone would validate at 6 only)
    meta = json.loads((tmp_path / "ft.json").read_text())
    assert meta["threshold"] == pytest.approx(float(found.group(2)), abs=0.005)
    # and the smallest object it keeps: a quarter of the folders' median annotated object
    from fsmeta.data.io import load_folder
    from fsmeta.metrics import median_object_area

    expected = round(0.25 * median_object_area(load_folder(images, masks).masks))
    assert expected > 0 and meta["min_size"] == expected and f"objects under {expected} px dropped" in out
    # and its predictor: eval.tta (on by default) — the threshold was chosen again on the bands' mean over
    # the 8 flips and turns, the one before is said, and predict will follow the record
    assert meta["tta"] is True and "mean over the 8 flips and 90° turns" in out
    before = re.search(r"scored as predicted, with TTA; ([0-9.]+) before", out)
    assert before, out


def test_finetune_with_a_pool_of_unannotated_images(tmp_path, tiny_config, capsys):
    """--pool: the bands' threshold moves toward the one at which the unannotated images get the
    support's foreground share (eval.pool_threshold), the support's own images left out of them."""
    images, masks = _lab_folder(tmp_path / "lab")
    support_i, support_m = _first_five(images, masks, tmp_path / "support")
    pretrained = scratch_checkpoint(tiny_config(), tmp_path / "pre")
    tiny = [o for o in TINY if not o.startswith("finetune.epochs=")]
    sets = [a for item in [*tiny, "finetune.crop_size=32", "data.finetune_stride={default: 16}", "finetune.holdout=0.25",
                           "finetune.steps=4", "finetune.val_every=2"] for a in ("--set", item)]
    base = ["finetune", *sets, "--weights", str(pretrained), "--support-images", str(support_i), "--support-masks", str(support_m)]
    # the pool is the whole lab folder: its 5 support images are not read as unannotated ones
    code = main([*base, "--pool", str(images), "--out", str(tmp_path / "ft.safetensors")])
    out = capsys.readouterr().out
    found = re.search(r"3 unannotated image\(s\) are predicted the support's foreground share (?:nearest \(the end of the grid\) )?at ([0-9.]+): "
                      r"(?:threshold ([0-9.]+), halfway from the bands' ([0-9.]+)|kept the bands' ([0-9.]+))", out)
    assert code == 0 and found, out
    meta = json.loads((tmp_path / "ft.json").read_text())
    assert meta["config"]["eval"]["pool_threshold"] is True
    matched = round(100 * float(found.group(1)))
    if found.group(2):  # halfway, rounded down to the grid
        assert round(100 * meta["threshold"]) == (round(100 * float(found.group(3))) + matched) // 2 == round(100 * float(found.group(2)))
    else:
        assert meta["threshold"] == pytest.approx(float(found.group(4)))
    # the same run without --pool keeps the bands' threshold (the one the pool started from) and says
    # how to give a pool; the option stays on (the default) in the record
    assert main([*base, "--out", str(tmp_path / "plain.safetensors")]) == 0
    assert "no --pool folder: the held-out bands' threshold alone" in capsys.readouterr().out
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert plain["threshold"] == pytest.approx(float(found.group(3) or found.group(4)))
    assert plain["config"]["eval"]["pool_threshold"] is True
    # turned off, the note is gone and the threshold is the same
    assert main([*base, "--set", "eval.pool_threshold=false", "--out", str(tmp_path / "off.safetensors")]) == 0
    assert "--pool" not in capsys.readouterr().out
    assert json.loads((tmp_path / "off.json").read_text())["threshold"] == plain["threshold"]
    # a pool of nothing but the support's own images has nothing unannotated to read
    code = main([*base, "--pool", str(support_i), "--out", str(tmp_path / "x.safetensors")])
    assert code == 2 and "every image there is a support image" in capsys.readouterr().err


def test_finetune_folders_must_come_together(tmp_path, tiny_config, capsys):
    pretrained = scratch_checkpoint(tiny_config(), tmp_path / "pre")
    code = main(["finetune", "--weights", str(pretrained), "--support-images", str(tmp_path), "--no-tracking"])
    assert code == 2 and "--support-images and --support-masks go together" in capsys.readouterr().err

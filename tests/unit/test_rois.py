"""`fsmeta predict --rois`: ImageJ ROI sets read back by roifile, QuPath GeoJSON read back by json
(and shapely), one polygon per cell, as many as counts.csv counts; overlays in the input's colours."""

import csv
import json

import numpy as np
import pytest
import roifile
import tifffile
import torch
from PIL import Image

from fsmeta.checkpoint import save_checkpoint
from fsmeta.cli import main
from fsmeta.errors import FsmetaError
from fsmeta.models import build_model
from fsmeta.predict import PredictSettings, predict_files
from fsmeta.rois import cell_outlines, parse_formats
from tests.conftest import brightness_model


def _discs(shape, centres, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, bool)
    for cy, cx in centres:
        out |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    return out


def _counts(path):
    with open(path) as f:
        return {r["image"]: int(r["cells"]) for r in csv.DictReader(f)}


def test_outlines_follow_pixel_edges():
    labels = np.zeros((20, 20), np.int32)
    labels[2:6, 3:8] = 1  # a 4×5 block
    labels[10, 10] = 2  # one pixel
    labels[12, 12] = labels[13, 13] = 3  # diagonal neighbours: one 8-connected cell
    shapely = pytest.importorskip("shapely.geometry")
    outlines = cell_outlines(labels)
    assert [c.label for c in outlines] == [1, 2, 3] and [c.area_px for c in outlines] == [20, 1, 2]
    polys = [shapely.Polygon(c.points) for c in outlines]
    assert all(p.is_valid for p in polys)
    assert polys[0].bounds == (3.0, 2.0, 8.0, 6.0)  # x0, y0, x1, y1 on the pixel edges
    # Marching squares cuts each convex corner by 1/8 px²: 4 corners of a block → area − 0.5.
    assert [p.area for p in polys] == [19.5, 0.5, 1.5]


def test_rois_and_geojson_read_back_and_match_counts(tmp_path):
    shapely = pytest.importorskip("shapely.geometry")
    inputs = tmp_path / "in"
    inputs.mkdir()
    grey = _discs((96, 96), [(20, 20), (20, 60), (70, 30), (75, 75)], 8)
    Image.fromarray(grey.astype(np.uint8) * 200).save(inputs / "grey.png")
    stack = np.stack([_discs((64, 64), [(16, 16)], 6), _discs((64, 64), [(16, 16), (44, 44), (16, 48)], 5)])
    tifffile.imwrite(inputs / "stack.tif", stack.astype(np.uint8) * 255, photometric="minisblack")
    out = tmp_path / "out"
    settings = PredictSettings(tile=64, overlap=16, rois=("imagej", "geojson"))
    predict_files(brightness_model(), sorted(inputs.iterdir()), out, settings, progress=False)
    counts = _counts(out / "counts.csv")
    assert counts == {"grey.png": 4, "stack.tif#0": 1, "stack.tif#1": 3}

    rois = roifile.roiread(out / "rois" / "grey.zip")
    assert len(rois) == counts["grey.png"]
    assert all(r.roitype == roifile.ROI_TYPE.POLYGON for r in rois)
    labels = np.asarray(Image.open(out / "labels" / "grey.png"))
    for roi in rois:  # each polygon encloses its own cell's pixels
        k = int(roi.name.split("-")[1])
        ys, xs = np.nonzero(labels == k)
        (x0, y0), (x1, y1) = roi.coordinates().min(0), roi.coordinates().max(0)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)

    stack_rois = roifile.roiread(out / "rois" / "stack.zip")
    assert len(stack_rois) == counts["stack.tif#0"] + counts["stack.tif#1"]
    assert sorted(r.position for r in stack_rois) == [1, 2, 2, 2]  # 1-based stack positions

    doc = json.loads((out / "rois" / "grey.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == counts["grey.png"]
    for f in doc["features"]:
        poly = shapely.shape(f["geometry"])
        area = f["properties"]["area_px"]
        assert f["geometry"]["type"] == "Polygon" and poly.is_valid
        assert area == int((labels == f["properties"]["label"]).sum())
        assert area - 0.5 * poly.length < poly.area <= area  # the diagonal cut of the corners, no more
    for page in (0, 1):
        page_doc = json.loads((out / "rois" / f"stack-p{page:03d}.geojson").read_text())
        assert len(page_doc["features"]) == counts[f"stack.tif#{page}"]


def test_empty_image_gives_empty_roi_files(tmp_path):
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "dark.png")
    out = tmp_path / "out"
    predict_files(brightness_model(), [tmp_path / "dark.png"], out, PredictSettings(rois=("imagej", "geojson")), progress=False)
    assert roifile.roiread(out / "rois" / "dark.zip") == []
    assert json.loads((out / "rois" / "dark.geojson").read_text())["features"] == []


def test_overlay_keeps_the_colours_of_an_rgb_input(tmp_path):
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[...] = (180, 40, 200)  # a pink-purple background, as H&E
    rgb[_discs((64, 64), [(32, 32)], 10)] = (250, 250, 250)
    Image.fromarray(rgb).save(tmp_path / "he.png")
    predict_files(brightness_model(), [tmp_path / "he.png"], tmp_path / "out", PredictSettings(), progress=False)
    drawn = np.asarray(Image.open(tmp_path / "out" / "overlays" / "he.png"))
    assert tuple(drawn[2, 2]) == (180, 40, 200)  # background untouched, in colour, not grey
    assert tuple(drawn[32, 22]) == (255, 220, 0)  # the outline


def test_cli_rois_flag(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("fcrn").eval()
    ckpt = save_checkpoint(tmp_path / "w.safetensors", model.state_dict(), {"arch": "fcrn", "bn_affine": False, "kind": "scratch"})
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    argv = ["predict", "--weights", str(ckpt), "--input", str(tmp_path / "a.png"), "--output", str(out), "--threshold", "0.4"]
    assert main([*argv, "--rois", "imagej,geojson"]) == 0
    cells = _counts(out / "counts.csv")["a.png"]
    assert len(roifile.roiread(out / "rois" / "a.zip")) == cells
    assert len(json.loads((out / "rois" / "a.geojson").read_text())["features"]) == cells
    capsys.readouterr()
    assert main([*argv, "--rois", "imagej,csv"]) == 2
    assert "--rois" in capsys.readouterr().err
    with pytest.raises(FsmetaError):
        parse_formats("")

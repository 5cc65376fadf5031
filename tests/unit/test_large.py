"""Huge images: OME-TIFF/BigTIFF and OME-Zarr streamed band by band give the masks, labels and
counts of the in-memory path, written as OME-Zarr that zarr reads back."""

import csv

import numpy as np
import pytest
import tifffile
import torch
import zarr
from PIL import Image

import fsmeta.large as large
from fsmeta.errors import FsmetaError
from fsmeta.large import open_lazy, predict_inputs
from fsmeta.predict import PredictSettings, list_inputs, predict_files
from tests.conftest import brightness_model


def _cells(h, w, n=40, seed=0, value=200):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = np.zeros((h, w), np.uint8)
    for _ in range(n):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(2, 15)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = value
    img[100:102, :] = value  # one long cell across every tile and band seam
    img[150:260, 37] = value  # and one down across the band seams
    return img


def _zarr_level0(folder):
    group = zarr.open_group(str(folder), mode="r")
    (ms,) = group.attrs["multiscales"]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["y", "x"]
    return np.asarray(group[ms["datasets"][0]["path"]][:])


@pytest.fixture
def stream_everything(monkeypatch):
    monkeypatch.setattr(large, "LARGE_PIXELS", 1000)  # every TIFF above 1000 px is "huge" here


@pytest.mark.parametrize("min_size,output", [(0, "auto"), (30, "ome-zarr")])
def test_streamed_tiff_equals_the_in_memory_path(tmp_path, stream_everything, min_size, output):
    img = _cells(300, 260)
    tifffile.imwrite(tmp_path / "slide.tif", img, tile=(64, 64), bigtiff=True)
    settings = PredictSettings(tile=64, overlap=16, min_size=min_size)
    (want,) = predict_files(brightness_model(), [tmp_path / "slide.tif"], tmp_path / "mem", settings, progress=False)
    (got,) = predict_inputs(brightness_model(), [tmp_path / "slide.tif"], tmp_path / "big", settings, progress=False, large_output=output)
    assert (got.cells, got.mean_area, got.foreground) == (want.cells, want.mean_area, want.foreground) and got.cells > 10
    if output == "auto":  # TIFF in, tiled BigTIFF out
        with tifffile.TiffFile(tmp_path / "big" / "labels" / "slide.tif") as tif:
            assert tif.is_bigtiff and tif.pages[0].is_tiled
        labels, masks = (tifffile.imread(tmp_path / "big" / kind / "slide.tif") for kind in ("labels", "masks"))
    else:
        labels, masks = (_zarr_level0(tmp_path / "big" / kind / "slide.ome.zarr") for kind in ("labels", "masks"))
    assert np.array_equal(labels, tifffile.imread(tmp_path / "mem" / "labels" / "slide.tif"))  # same cells, same numbers
    assert np.array_equal(masks, tifffile.imread(tmp_path / "mem" / "masks" / "slide.tif"))
    assert not [p for p in (tmp_path / "big").rglob("*") if p.name.startswith(".") and p.name.endswith("tmp")]  # no work files left


def test_ome_zarr_input_16_bit_and_counts_in_input_order(tmp_path):
    img16 = _cells(200, 180, seed=1, value=1).astype(np.uint16) * 3000 + 500  # scaled by its own range, as in memory
    group = zarr.open_group(str(tmp_path / "in" / "well.ome.zarr"), mode="w", zarr_format=2)
    group.create_array("0", data=img16[None], chunks=(1, 64, 64))
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"},
                                                              {"name": "x", "type": "space"}], "datasets": [{"path": "0"}]}]
    Image.fromarray(_cells(64, 64, n=3, seed=2)).save(tmp_path / "in" / "small.png")
    tifffile.imwrite(tmp_path / "ref.tif", img16)
    inputs = list_inputs(tmp_path / "in")
    assert [p.name for p in inputs] == ["small.png", "well.ome.zarr"]
    settings = PredictSettings(tile=64, overlap=16)
    rows = predict_inputs(brightness_model(), inputs, tmp_path / "out", settings, progress=False)
    (want,) = predict_files(brightness_model(), [tmp_path / "ref.tif"], tmp_path / "mem", settings, progress=False)
    assert [r.name for r in rows] == ["small.png", "well.ome.zarr"] and rows[1].cells == want.cells > 0
    assert np.array_equal(_zarr_level0(tmp_path / "out" / "labels" / "well.ome.zarr"), tifffile.imread(tmp_path / "mem" / "labels" / "ref.tif"))
    with open(tmp_path / "out" / "counts.csv") as f:
        assert [(r["image"], int(r["cells"])) for r in csv.DictReader(f)] == [(r.name, r.cells) for r in rows]


def test_lazy_reading_of_pyramidal_rgb_ome_tiff(tmp_path):
    rgb = np.stack([_cells(128, 96, seed=3)] * 3, axis=-1)
    with tifffile.TiffWriter(tmp_path / "he.ome.tif", bigtiff=True) as tif:
        tif.write(rgb, tile=(64, 64), subifds=1, metadata={"axes": "YXS"}, photometric="rgb")
        tif.write(rgb[::2, ::2], tile=(64, 64), subfiletype=1, photometric="rgb")
    image = open_lazy(tmp_path / "he.ome.tif")
    assert image.shape == (128, 96) and image.read(10, 20, 30, 50).shape == (10, 20, 3)
    assert np.array_equal(image.read(10, 20, 30, 50), rgb[10:20, 30:50])
    image.close()


def test_streamed_images_refuse_the_watershed(tmp_path, stream_everything):
    tifffile.imwrite(tmp_path / "slide.tif", _cells(64, 64))
    with pytest.raises(FsmetaError, match="--watershed needs the whole mask"):
        predict_inputs(brightness_model(), [tmp_path / "slide.tif"], tmp_path / "out", PredictSettings(watershed=True), progress=False)


def test_cli_streams_a_huge_tiff(tmp_path, stream_everything, capsys):
    from fsmeta.checkpoint import save_checkpoint
    from fsmeta.cli import main
    from fsmeta.models import build_model

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "w.safetensors", build_model("unet").state_dict(), {"arch": "unet", "bn_affine": False, "kind": "meta"})
    tifffile.imwrite(tmp_path / "slide.tif", _cells(96, 80))
    args = ["predict", "--weights", str(ckpt), "--input", str(tmp_path / "slide.tif"), "--output", str(tmp_path / "out"), "--tile", "64",
            "--overlap", "16", "--threshold", "0.45"]
    assert main([*args, "--large-output", "ome-zarr"]) == 0
    labels = _zarr_level0(tmp_path / "out" / "labels" / "slide.ome.zarr")
    with open(tmp_path / "out" / "counts.csv") as f:
        (row,) = csv.DictReader(f)
    assert int(row["cells"]) == labels.max() and labels.shape == (96, 80)


def test_streamed_rois_equal_the_in_memory_ones(tmp_path, stream_everything):
    import json

    import roifile

    tifffile.imwrite(tmp_path / "slide.tif", _cells(300, 260, seed=4))
    settings = PredictSettings(tile=64, overlap=16, rois=("imagej", "geojson"))
    (want,) = predict_files(brightness_model(), [tmp_path / "slide.tif"], tmp_path / "mem", settings, progress=False)
    (got,) = predict_inputs(brightness_model(), [tmp_path / "slide.tif"], tmp_path / "big", settings, progress=False)
    mem, big = (json.loads((tmp_path / d / "rois" / "slide.geojson").read_text()) for d in ("mem", "big"))
    assert big == mem and len(big["features"]) == got.cells == want.cells  # the long cells cross band seams
    rois = roifile.roiread(tmp_path / "big" / "rois" / "slide.zip")
    assert [r.name for r in rois] == [r.name for r in roifile.roiread(tmp_path / "mem" / "rois" / "slide.zip")]

"""The channel colour images become (fsmeta.data.colour): the haematoxylin rendering against
hand-built stain mixtures, ``auto``'s decision from the images, and the channel carried from a
store or a support folder into the checkpoint and from the checkpoint into predict."""

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from skimage.color import hed2rgb

import fsmeta.large as large
from fsmeta.checkpoint import model_from_checkpoint, save_checkpoint
from fsmeta.cli import main
from fsmeta.config import ConfigError, load_config
from fsmeta.data.colour import (
    MIN_CHROMA, choose_colour, evidence, haematoxylin_grey, resolve_colour, sample_positions,
)
from fsmeta.data.io import import_folder, image_to_unit, load_folder, to_grey
from fsmeta.data.store import open_store
from fsmeta.errors import DataError, FsmetaError
from fsmeta.models import build_model
from fsmeta.predict import PredictSettings, predict_files


def _stains(h, e):
    """8-bit RGB of haematoxylin and eosin concentrations (skimage's H&E stain vectors)."""
    hed = np.stack([h, e, np.zeros_like(h)], -1)
    return np.clip(np.rint(hed2rgb(hed) * 255), 0, 255).astype(np.uint8)


def he_tile(seed=0, side=64):
    """A synthetic H&E image: eosin-pink tissue, haematoxylin-dark round nuclei, a white gap; and its nuclei."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    nuclei = np.zeros((side, side), bool)
    for _ in range(6):
        cy, cx, r = rng.integers(6, side - 6, 2).tolist() + [int(rng.integers(3, 7))]
        nuclei |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    e = 0.04 + 0.01 * rng.random((side, side))
    h = np.where(nuclei, 0.12, 0.004) + 0.003 * rng.random((side, side))
    e[:, : side // 8] = 0.0  # a strip of empty glass
    h[:, : side // 8] = 0.0
    return _stains(h, e), nuclei


def test_haematoxylin_rendering_keeps_haematoxylin_and_whitens_eosin():
    # a pixel of haematoxylin alone renders as its own luminance; eosin alone (no haematoxylin) as white
    h_only = _stains(np.full((1, 1), 0.1), np.zeros((1, 1)))
    e_only = _stains(np.zeros((1, 1)), np.full((1, 1), 0.1))
    assert abs(int(haematoxylin_grey(h_only)[0, 0]) - int(to_grey(h_only)[0, 0])) <= 1
    assert haematoxylin_grey(e_only)[0, 0] >= 254 and to_grey(e_only)[0, 0] < 200  # white within the 8-bit rounding of the input
    # so on H&E the nuclei stand out more against the tissue than in luminance (Fisher ratio)
    rgb, nuclei = he_tile()

    def fisher(x):
        f, b = x[nuclei].astype(float), x[~nuclei].astype(float)
        return (f.mean() - b.mean()) ** 2 / (f.var() + b.var())

    assert fisher(haematoxylin_grey(rgb)) > 1.5 * fisher(to_grey(rgb))
    # per pixel: a tile renders as the same pixels of the whole image (tiled predict relies on it)
    assert np.array_equal(haematoxylin_grey(rgb[10:40, 5:50]), haematoxylin_grey(rgb)[10:40, 5:50])
    # RGBA: alpha is dropped
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], -1)
    assert np.array_equal(haematoxylin_grey(rgba), haematoxylin_grey(rgb))


def test_haematoxylin_of_16_bit_rgb_is_the_8_bit_rendering_rescaled():
    rgb, _ = he_tile()
    wide = rgb.astype(np.uint16) * 257  # the same colours, white = 65535
    got = image_to_unit(wide, colour="haematoxylin")
    want = haematoxylin_grey(rgb).astype(np.float64)
    want = (want - want.min()) / (want.max() - want.min())
    assert got.dtype == np.float32 and np.abs(got - want).max() < 1.5 / 255  # 8-bit rounding only


def test_haematoxylin_refuses_what_it_cannot_read():
    with pytest.raises(DataError, match=r"^slide.png is single-channel; the haematoxylin channel is read from RGB"):
        to_grey(np.zeros((8, 8), np.uint8), "haematoxylin", "slide.png")
    with pytest.raises(DataError, match=r"^f.tif is float32 RGB; the haematoxylin channel reads 8- or 16-bit RGB"):
        image_to_unit(np.zeros((8, 8, 3), np.float32), "f.tif", "haematoxylin")


def test_auto_decides_from_the_images():
    he = [he_tile(seed)[0] for seed in range(3)]
    channel, reason = choose_colour(he, "he")
    assert channel == "haematoxylin" and reason.startswith("3 of 3 sampled RGB image(s) are stained brightfield")
    e = evidence(he[0])
    assert e.rgb and e.chroma >= MIN_CHROMA and e.bright > 0.4 and e.correlation > 0.5
    # an RGB file of a grey image: no colour
    grey_rgb = np.repeat(to_grey(he[0])[..., None], 3, -1)
    assert evidence(grey_rgb).chroma == 0.0 and choose_colour([grey_rgb], "g")[0] == "grey"
    # fluorescence saved as RGB: coloured but dark where nothing is
    fluo = np.zeros((64, 64, 3), np.uint8)
    fluo[20:30, 20:30, 2] = 220
    fluo[15:35, 15:35, 1] = 90
    assert evidence(fluo).bright < 0.4 and choose_colour([fluo], "f")[0] == "grey"
    # single-channel images, and a set where most images are not stained brightfield
    assert choose_colour([np.zeros((8, 8), np.uint8)], "em") == ("grey", "1 of 1 sampled image(s) of em are single-channel")
    assert choose_colour([he[0], fluo, fluo], "mixed")[0] == "grey"
    assert choose_colour([he[0], he[1], fluo], "mostly")[0] == "haematoxylin"
    # asked for explicitly, the images are not even read
    assert resolve_colour("grey", lambda: pytest.fail("read"), "x") == ("grey", "asked for")
    with pytest.raises(DataError, match=r"data.colour is 'blue'; choose one of auto, grey, haematoxylin"):
        resolve_colour("blue", list, "x")
    assert sample_positions(5) == [0, 1, 2, 3, 4] and sample_positions(100, 4) == [0, 33, 66, 99]


def test_config_refuses_an_unknown_colour():
    assert load_config(None, []).data.colour == "auto"
    with pytest.raises(ConfigError, match=r"data.colour='rgb' is not 'auto', 'grey' or 'haematoxylin'"):
        load_config(None, ["data.colour=rgb"])


def _he_folders(tmp_path, n=3):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(n):
        rgb, nuclei = he_tile(i)
        Image.fromarray(rgb).save(images / f"s{i}.png")
        Image.fromarray((nuclei * 255).astype(np.uint8)).save(masks / f"s{i}.png")
    return images, masks


def test_import_records_the_channel_and_stores_its_rendering(tmp_path, capsys):
    images, masks = _he_folders(tmp_path)
    assert main(["data", "import", "he", "--images", str(images), "--masks", str(masks), "--data-root", str(tmp_path / "d")]) == 0
    assert "colour: haematoxylin (auto: 3 of 3 sampled RGB image(s) are stained brightfield" in capsys.readouterr().out
    store = open_store(tmp_path / "d", "he")
    assert store.meta["colour"] == "haematoxylin"
    for k in range(3):  # bit for bit the rendering of each file
        assert np.array_equal(store.images[k], haematoxylin_grey(np.asarray(Image.open(images / f"s{k}.png"))))
    import_folder(tmp_path / "d", "he-grey", images, masks, colour="grey")
    grey = open_store(tmp_path / "d", "he-grey")
    assert grey.meta["colour"] == "grey" and grey.meta["colour_reason"] == "asked for"
    assert np.array_equal(grey.images[0], to_grey(np.asarray(Image.open(images / "s0.png"))))
    # a support folder read for fine-tuning decides the same way
    assert load_folder(images, masks).meta["colour"] == "haematoxylin"
    assert load_folder(images, masks, colour="grey").meta["colour"] == "grey"


def _scratch_checkpoint(path, **fields):
    torch.manual_seed(0)
    model = build_model("fcrn")
    return save_checkpoint(path, model.state_dict(), {"arch": "fcrn", "bn_affine": False, "kind": "scratch", **fields})


class Dark(torch.nn.Module):
    """Foreground = pixels darker than 204 of 255 (normalised 0.6): luminance marks eosin tissue (~174)
    as well as nuclei, the haematoxylin rendering (tissue ~243) the nuclei alone."""

    stride = 8

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(40.0))

    def forward(self, x):
        return self.gain * (0.6 - x)


def test_predict_feeds_the_model_the_channel_of_its_checkpoint(tmp_path):
    rgb, nuclei = he_tile(side=64)
    Image.fromarray(rgb).save(tmp_path / "he.png")
    Image.fromarray(haematoxylin_grey(rgb)).save(tmp_path / "rendered.png")
    model = Dark()
    settings = PredictSettings(tile=64, overlap=16, threshold=0.5, colour="haematoxylin")
    predict_files(model, [tmp_path / "he.png"], tmp_path / "h", settings, progress=False)
    predict_files(model, [tmp_path / "rendered.png"], tmp_path / "r", PredictSettings(tile=64, overlap=16), progress=False)
    got = np.asarray(Image.open(tmp_path / "h" / "masks" / "he.png"))
    want = np.asarray(Image.open(tmp_path / "r" / "masks" / "rendered.png"))
    assert np.array_equal(got, want)  # RGB through the rendering = the rendered image read as grey
    assert abs((got > 0).mean() - nuclei.mean()) < 0.02  # the nuclei, not the tissue (luminance would take 7/8 of the image)
    # a grey image into a model of the haematoxylin channel: refused before anything is written
    Image.fromarray(to_grey(rgb)).save(tmp_path / "grey.png")
    with pytest.raises(FsmetaError, match=r"(?s)1 of 1 input image\(s\) cannot be segmented; nothing was written:\n  "
                       r".*grey.png is single-channel; the haematoxylin channel is read from RGB images\n"
                       r"the model was fine-tuned on the haematoxylin channel of RGB images"):
        predict_files(model, [tmp_path / "grey.png"], tmp_path / "g", settings, progress=False)
    assert not (tmp_path / "g").exists()


def test_predict_cli_reads_the_colour_a_checkpoint_records(tmp_path, capsys):
    rgb, _ = he_tile(side=64)
    Image.fromarray(rgb).save(tmp_path / "he.png")
    Image.fromarray(haematoxylin_grey(rgb)).save(tmp_path / "rendered.png")
    h = _scratch_checkpoint(tmp_path / "h.safetensors", colour="haematoxylin")
    g = _scratch_checkpoint(tmp_path / "g.safetensors")
    base = ["--tile", "64", "--overlap", "16", "--threshold", "0.5", "--no-tta"]
    assert main(["predict", "--weights", str(h), "--input", str(tmp_path / "he.png"), "--output", str(tmp_path / "h"), *base]) == 0
    Image.fromarray(to_grey(rgb)).save(tmp_path / "grey.png")  # a grey image is refused: the recorded colour was applied
    capsys.readouterr()
    assert main(["predict", "--weights", str(h), "--input", str(tmp_path / "grey.png"), "--output", str(tmp_path / "x"), *base]) == 2
    assert "grey.png is single-channel; the haematoxylin channel is read from RGB images" in capsys.readouterr().err
    assert main(["predict", "--weights", str(g), "--input", str(tmp_path / "rendered.png"), "--output", str(tmp_path / "g"), *base]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "h" / "labels" / "he.png")),
                          np.asarray(Image.open(tmp_path / "g" / "labels" / "rendered.png")))


def test_streamed_rgb_equals_the_in_memory_path_in_the_haematoxylin_channel(tmp_path, monkeypatch):
    monkeypatch.setattr(large, "LARGE_PIXELS", 1000)
    rgb = np.concatenate([he_tile(s, side=96)[0] for s in range(3)], axis=1)  # 96 × 288
    tifffile.imwrite(tmp_path / "slide.tif", rgb, photometric="rgb", tile=(32, 32))
    model = Dark()
    settings = PredictSettings(tile=64, overlap=16, colour="haematoxylin")
    (want,) = predict_files(model, [tmp_path / "slide.tif"], tmp_path / "mem", settings, progress=False)
    (got,) = large.predict_inputs(model, [tmp_path / "slide.tif"], tmp_path / "big", settings, progress=False)
    assert np.array_equal(tifffile.imread(tmp_path / "big" / "masks" / "slide.tif"), tifffile.imread(tmp_path / "mem" / "masks" / "slide.tif"))
    assert (got.cells, got.foreground) == (want.cells, want.foreground) and want.foreground < 0.2  # nuclei only
    tifffile.imwrite(tmp_path / "grey.tif", to_grey(rgb), tile=(32, 32))
    with pytest.raises(DataError, match=r"grey.tif is single-channel; the model reads the haematoxylin channel"):
        large.predict_inputs(model, [tmp_path / "grey.tif"], tmp_path / "g", settings, progress=False)


def test_finetune_on_folders_records_the_channel_its_support_was_read_as(tmp_path, tiny_config, capsys):
    import json

    from fsmeta.train import scratch_checkpoint
    from tests.conftest import TINY

    images, masks = _he_folders(tmp_path, n=4)
    pretrained = scratch_checkpoint(tiny_config(), tmp_path / "pre")
    tiny = [o for o in TINY if not o.startswith("finetune.epochs=")]
    sets = [a for item in [*tiny, "finetune.crop_size=32", "data.finetune_stride={default: 32}", "data.min_foreground=1",
                           "finetune.steps=2", "finetune.holdout=0", "eval.tta=false"] for a in ("--set", item)]
    code = main(["finetune", *sets, "--weights", str(pretrained), "--support-images", str(images), "--support-masks",
                 str(masks), "--out", str(tmp_path / "h.safetensors"), "--no-tracking"])  # data.colour: auto by default
    assert code == 0, capsys.readouterr().err
    assert "colour: haematoxylin (auto: 4 of 4 sampled RGB image(s) are stained brightfield" in capsys.readouterr().out
    assert json.loads((tmp_path / "h.json").read_text())["colour"] == "haematoxylin"  # what predict will feed it

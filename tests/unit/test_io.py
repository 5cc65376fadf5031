"""Reading images and masks in every accepted format, pairing by name, and `fsmeta data import`,
including each kind of bad input with the exact message a user sees."""

import logging

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from fsmeta.cli import main
from fsmeta.data.io import (
    import_folder, image_to_unit, list_images, load_folder, mask_to_binary, pair_by_name, read_image, read_planes,
    support_crop_index, to_grey,
)
from fsmeta.data.registry import load_dataset
from fsmeta.data.store import open_store
from fsmeta.errors import DataError
from fsmeta.losses import weighted_bce


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def _tif(path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array, **kw)
    return path


def _pair_folders(tmp_path, n=3, h=24, w=32):
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 256, (h, w), dtype=np.uint8)
        _png(tmp_path / "images" / f"cell{i}.png", img)
        _png(tmp_path / "masks" / f"cell{i}_mask.png", ((img > 128) * 255).astype(np.uint8))
    return tmp_path / "images", tmp_path / "masks"


# ---------------------------------------------------------------- formats


def test_png_grey_16bit_rgb_rgba_and_1bit(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    assert np.array_equal(read_image(_png(tmp_path / "g.png", grey)), grey)
    deep = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    got = read_image(_png(tmp_path / "d.png", deep))
    assert got.dtype == np.uint16 and np.array_equal(got, deep)
    rgba = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    assert read_image(_png(tmp_path / "c.png", rgba)).shape == (20, 30, 4)
    rgb = rgba[..., :3].copy()
    assert np.array_equal(to_grey(read_image(_png(tmp_path / "rgb.png", rgb))), to_grey(rgba))
    ones = np.zeros((20, 30), bool)
    ones[5:10, 5:10] = True
    Image.fromarray(ones).convert("1").save(tmp_path / "bit.png")
    bit = read_image(tmp_path / "bit.png")
    # 1-bit masks read as 0/255, so a "> 127" rule keeps them
    assert set(np.unique(bit)) == {0, 255} and mask_to_binary(bit, "half").sum() == 25


def test_jpeg_and_bmp_images(tmp_path):
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(read_image(_png(tmp_path / "g.bmp", grey)), grey)  # lossless
    assert np.array_equal(read_image(_png(tmp_path / "c.BMP", rgb)), rgb)
    smooth = np.tile(np.linspace(20, 230, 30).astype(np.uint8), (20, 1))
    got = read_image(_png(tmp_path / "s.jpg", smooth))
    assert got.shape == (20, 30) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - smooth).max() <= 8  # lossy, but the same picture
    assert read_image(_png(tmp_path / "c.jpeg", rgb)).shape == (20, 30, 3)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 20)
    with pytest.raises(DataError, match=r"bad.jpg is not a readable JPEG \(corrupt or truncated\)"):
        read_image(tmp_path / "bad.jpg")
    full = (tmp_path / "c.jpeg").read_bytes()
    (tmp_path / "cut.jpeg").write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match=r"cut.jpeg is not a readable JPEG \(corrupt or truncated\)"):
        read_image(tmp_path / "cut.jpeg")


def test_lossy_mask_rule_by_hand():
    # commonest non-zero value 255: foreground above 127.5 (compression noise 1-3 and 127 is background)
    plane = np.array([[0, 1, 2], [255, 255, 128], [127, 3, 255]], np.uint8)
    assert mask_to_binary(plane, "lossy").tolist() == [[0, 0, 0], [1, 1, 1], [0, 0, 1]]
    assert mask_to_binary(plane).sum() == 8  # "any non-zero" grows every object by its noise
    # a 0/1 mask: commonest non-zero value 1, foreground above 0.5
    assert mask_to_binary(np.array([[1, 1, 1], [2, 0, 0]], np.uint8), "lossy").sum() == 4
    assert mask_to_binary(np.zeros((4, 4), np.uint8), "lossy").sum() == 0
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, :, 1], rgb[1, 1] = 255, (0, 0, 40)  # one channel at full value; a pixel of noise
    assert mask_to_binary(rgb, "lossy").tolist() == [[1, 1], [0, 0]]


def test_jpeg_masks_import_as_the_binary_mask_they_were(tmp_path, caplog):
    yy, xx = np.mgrid[:48, :64]
    truth = (((yy - 20) ** 2 + (xx - 30) ** 2) < 12 ** 2) | ((yy > 35) & (xx > 45))
    rng = np.random.default_rng(4)
    for i in range(2):
        _png(tmp_path / "images" / f"w{i}.jpg", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
        (tmp_path / "masks").mkdir(exist_ok=True)
        Image.fromarray((truth * 255).astype(np.uint8)).save(tmp_path / "masks" / f"w{i}_mask.jpg", quality=90)
    noisy = read_image(tmp_path / "masks" / "w0_mask.jpg")
    assert mask_to_binary(noisy).sum() > truth.sum()  # the compression noise around every edge
    with caplog.at_level(logging.WARNING):
        import_folder(tmp_path / "data", "jpegs", tmp_path / "images", tmp_path / "masks")
    assert "2 of 2 mask(s) in" in caplog.text and "are JPEG (lossy; e.g. w0_mask.jpg)" in caplog.text
    s = open_store(tmp_path / "data", "jpegs")
    assert s.ids == ["w0", "w1"] and all(np.array_equal(m, truth) for m in s.masks)


def test_tiff_8_16_bit_rgb_and_stack(tmp_path):
    rng = np.random.default_rng(2)
    a8 = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    assert np.array_equal(read_image(_tif(tmp_path / "a.tif", a8)), a8)
    a16 = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    assert np.array_equal(read_image(_tif(tmp_path / "b.tiff", a16)), a16)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert read_image(_tif(tmp_path / "c.tif", rgb, photometric="rgb")).shape == (20, 30, 3)
    stack = rng.integers(0, 256, (5, 20, 30), dtype=np.uint8)
    planes = read_planes(_tif(tmp_path / "s.tif", stack))
    assert len(planes) == 5 and np.array_equal(planes[3], stack[3])
    with pytest.raises(DataError, match="is a stack of 5 pages; expected a single image"):
        read_image(tmp_path / "s.tif")


def test_tiff_channel_axis_is_read_as_colour_samples_as_the_streamed_reader_does(tmp_path):
    from fsmeta.large import open_lazy

    rng = np.random.default_rng(5)
    two = rng.integers(0, 65536, (2, 20, 30), dtype=np.uint16)  # nuclei + cytoplasm, ImageJ CYX
    path = _tif(tmp_path / "two.tif", two, imagej=True, metadata={"axes": "CYX"})
    got = read_image(path)  # one image with two samples, not a stack of two pages
    assert got.shape == (20, 30, 2) and np.array_equal(got[..., 1], two[1])
    lazy = open_lazy(path)
    try:
        assert np.array_equal(lazy.read(0, 20, 0, 30), got)
    finally:
        lazy.close()
    assert np.array_equal(image_to_unit(got), image_to_unit(two[0]))  # grey + alpha: the first channel
    three = rng.integers(0, 256, (3, 20, 30), dtype=np.uint8)
    got = read_image(_tif(tmp_path / "three.ome.tif", three, ome=True, metadata={"axes": "CYX"}))
    assert np.array_equal(got, np.moveaxis(three, 0, -1))
    # a mask of the 2-channel image pairs with it (no "1 page(s) but 2" from a channel axis)
    _tif(tmp_path / "images" / "a.tif", two, imagej=True, metadata={"axes": "CYX"})
    _png(tmp_path / "masks" / "a.png", (two[0] > 30000).astype(np.uint8))
    assert load_folder(tmp_path / "images", tmp_path / "masks").images[0].shape == (20, 30)
    five = rng.integers(0, 256, (5, 20, 30), dtype=np.uint8)
    with pytest.raises(DataError, match=r"five.tif has 5 channels \(axes 'CYX'\); fsmeta reads grey, 2-channel, RGB or RGBA"):
        read_image(_tif(tmp_path / "five.tif", five, imagej=True, metadata={"axes": "CYX"}))


def test_16bit_is_scaled_by_its_own_range_never_clipped():
    raw = np.array([[1000, 2000], [3000, 5000]], np.uint16).repeat(8, 0).repeat(8, 1)
    unit = image_to_unit(raw)
    assert unit.dtype == np.float32 and unit.min() == 0.0 and unit.max() == 1.0
    assert np.allclose(unit[0, 8], 0.25)  # (2000 - 1000) / 4000: the full 16-bit detail survives
    eight = np.full((8, 8), 200, np.uint8)
    assert image_to_unit(eight) is eight  # 8-bit is stored as is and read as x / 255


def test_instance_masks_become_binary():
    labels = np.zeros((10, 10), np.uint16)
    labels[1:3, 1:3], labels[5:8, 5:8] = 1, 300
    assert mask_to_binary(labels).sum() == 4 + 9
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 3] = 255  # opaque everywhere: alpha is not foreground
    rgba[1:3, 1:3, 0], rgba[5:8, 5:8, 2] = 7, 1
    assert mask_to_binary(rgba).sum() == 4 + 9


# ---------------------------------------------------------------- pairing


def test_pairing_by_name_with_mask_suffixes_and_case(tmp_path):
    imgs = [tmp_path / n for n in ("A1.tif", "b_2.png", "c3.tif", "cell_gt.tif")]
    masks = [tmp_path / n for n in ("a1_mask.png", "B_2_Label.tif", "c3.png", "cell_gt.png")]
    pairs = dict((i.name, m.name) for i, m in pair_by_name(imgs, masks))
    assert pairs == {"A1.tif": "a1_mask.png", "b_2.png": "B_2_Label.tif", "c3.tif": "c3.png", "cell_gt.tif": "cell_gt.png"}


def test_image_name_suffixes_pair_as_cellpose_names_them(tmp_path):
    imgs = [tmp_path / n for n in ("000_img.png", "001_IMG.tif", "b.png", "b_img.png", "c_raw.tif")]
    masks = [tmp_path / n for n in ("000_masks.png", "001_masks.png", "b_mask.png", "b_img_mask.png", "c.png")]
    pairs = dict((i.name, m.name) for i, m in pair_by_name(imgs, masks))
    # an exact name wins (b_mask.png is b.png's, not b_img.png's); the image suffix is tried only after it
    assert pairs == {"000_img.png": "000_masks.png", "001_IMG.tif": "001_masks.png", "b.png": "b_mask.png",
                     "b_img.png": "b_img_mask.png", "c_raw.tif": "c.png"}
    with pytest.raises(DataError, match=r"ambiguous names: a_img.png and a_raw.png \(both images of a_mask.png\)"):
        pair_by_name([tmp_path / "a_img.png", tmp_path / "a_raw.png"], [tmp_path / "a_mask.png"])


def test_one_folder_of_images_and_masks_imports_as_cellpose_lays_it_out(tmp_path):
    rng = np.random.default_rng(6)
    folder = tmp_path / "train"
    truth = {}
    for i in range(3):
        img = rng.integers(0, 256, (24, 32), dtype=np.uint8)
        labels = np.zeros((24, 32), np.uint16)
        labels[2 + i : 9 + i, 3:10], labels[12:20, 15 + i : 25] = 1, 2  # two instances
        _png(folder / f"{i:03d}_img.png", img)
        _tif(folder / f"{i:03d}_masks.tif", labels)
        truth[f"{i:03d}_img"] = (labels > 0).astype(np.uint8)
    import_folder(tmp_path / "data", "cp", folder, folder)
    s = open_store(tmp_path / "data", "cp")
    assert s.ids == ["000_img", "001_img", "002_img"]
    assert all(np.array_equal(m, truth[i]) for i, m in zip(s.ids, s.masks))
    _png(folder / "003_img.png", np.zeros((24, 32), np.uint8))  # an image without its mask is named
    with pytest.raises(DataError, match=r"1 image\(s\) without a mask: 003_img.png"):
        import_folder(tmp_path / "data", "cp2", folder, folder)
    lone = tmp_path / "lone"
    _png(lone / "a.png", np.zeros((24, 32), np.uint8))
    with pytest.raises(DataError, match=r"given as both the image and the mask folder but no file in it is named as a mask"):
        load_folder(lone, lone)


def test_unpaired_files_are_each_named(tmp_path):
    imgs = [tmp_path / "images" / n for n in ("a.png", "b.png", "c.png")]
    masks = [tmp_path / "masks" / n for n in ("a.png", "x_mask.png")]
    with pytest.raises(DataError) as err:
        pair_by_name(imgs, masks)
    msg = str(err.value)
    assert "2 image(s) without a mask: b.png, c.png" in msg and "1 mask(s) without an image: x_mask.png" in msg


# ---------------------------------------------------------------- import and bad input, one test each


def test_import_then_usable_as_a_target(tmp_path, tiny_config):
    images, masks = _pair_folders(tmp_path, n=3)
    root = tmp_path / "data"
    import_folder(root, "mine", images, masks)
    s = open_store(root, "mine")
    assert s.meta["kind"] == "imported" and len(s) == 3 and s.ids == ["cell0", "cell1", "cell2"]
    assert load_dataset("mine", tiny_config("data.target=mine", "data.sources=[synth-em]")).ids == s.ids


def test_mixed_8_and_16_bit_import_as_float(tmp_path):
    images, masks = _pair_folders(tmp_path, n=2)
    _tif(images / "deep.tif", np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 50)
    _png(masks / "deep.png", np.ones((24, 32), np.uint8))
    import_folder(tmp_path / "data", "mixed", images, masks)
    s = open_store(tmp_path / "data", "mixed")
    assert s.meta["image_dtype"] == "float32" and s.images[s.ids.index("deep")].max() == 1.0


def test_corrupt_file(tmp_path):
    images, masks = _pair_folders(tmp_path)
    (images / "cell1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(DataError, match=r"cell1.png is not a readable PNG \(corrupt or truncated\)"):
        import_folder(tmp_path / "data", "mine", images, masks)


def test_truncated_tiff(tmp_path):
    images, masks = _pair_folders(tmp_path)
    (images / "cell1.png").unlink()
    full = _tif(tmp_path / "full.tif", np.random.default_rng(0).integers(0, 256, (24, 32), dtype=np.uint8)).read_bytes()
    (images / "cell1.tif").write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match=r"cell1.tif is truncated: its image data ends at byte \d+ but the file has \d+ bytes"):
        import_folder(tmp_path / "data", "mine", images, masks)


def test_image_with_no_mask(tmp_path):
    images, masks = _pair_folders(tmp_path)
    (masks / "cell2_mask.png").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\) without a mask: cell2.png"):
        import_folder(tmp_path / "data", "mine", images, masks)


def test_mask_of_another_size(tmp_path):
    images, masks = _pair_folders(tmp_path)
    _png(masks / "cell1_mask.png", np.zeros((20, 30), np.uint8))
    with pytest.raises(DataError, match=r"cell1_mask.png is 30×20 but .*cell1.png is 32×24"):
        import_folder(tmp_path / "data", "mine", images, masks)


def test_all_zero_mask_warns_and_weights_one(tmp_path, caplog):
    images, masks = _pair_folders(tmp_path)
    _png(masks / "cell1_mask.png", np.zeros((24, 32), np.uint8))
    with caplog.at_level(logging.WARNING):
        import_folder(tmp_path / "data", "mine", images, masks)
    assert "cell1_mask.png has no foreground pixels; its weighted BCE uses w = 1" in caplog.text
    s = open_store(tmp_path / "data", "mine")
    y = torch.from_numpy(s.masks[1].astype(np.float32))[None, None]
    logits = torch.randn_like(y)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    assert torch.allclose(weighted_bce(logits, y), plain)


def test_non_image_file(tmp_path):
    images, masks = _pair_folders(tmp_path)
    (images / "notes.txt").write_text("stain: DAPI")
    (images / ".DS_Store").write_bytes(b"\x00")  # hidden clutter is ignored
    with pytest.raises(DataError, match=r"holds file\(s\) that are not TIFF, PNG, JPEG or BMP images: notes.txt"):
        import_folder(tmp_path / "data", "mine", images, masks)


def test_empty_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match=r"image folder .*images is empty: no .tif, .tiff, .png, .jpg, .jpeg, .bmp files"):
        import_folder(tmp_path / "data", "mine", tmp_path / "images", tmp_path / "masks")


def test_one_by_one_image(tmp_path):
    images, masks = _pair_folders(tmp_path)
    _png(images / "dot.png", np.zeros((1, 1), np.uint8))
    _png(masks / "dot.png", np.zeros((1, 1), np.uint8))
    with pytest.raises(DataError, match=r"dot.png is 1×1 pixels; fsmeta needs images of at least 8×8"):
        import_folder(tmp_path / "data", "mine", images, masks)


def test_every_bad_pair_is_named_and_nothing_is_written(tmp_path):
    images, masks = _pair_folders(tmp_path, n=4)
    (images / "cell0.png").write_bytes(b"not a png")
    _png(masks / "cell2_mask.png", np.zeros((5, 9), np.uint8))
    root = tmp_path / "data"
    with pytest.raises(DataError) as err:
        import_folder(root, "mine", images, masks)
    assert "2 of 4 image/mask pair(s) cannot be used" in str(err.value)
    assert "cell0.png" in str(err.value) and "cell2_mask.png is 9×5" in str(err.value)
    assert not root.exists() or list(root.iterdir()) == []


def test_cli_import_errors_and_refuses_to_overwrite(tmp_path, capsys):
    images, masks = _pair_folders(tmp_path)
    root = str(tmp_path / "data")
    assert main(["data", "import", "mine", "--images", str(images), "--masks", str(masks), "--data-root", root]) == 0
    assert "imported 3 image/mask pairs" in capsys.readouterr().out
    assert main(["data", "import", "mine", "--images", str(images), "--masks", str(masks), "--data-root", root]) == 2
    assert "already exists" in capsys.readouterr().err
    (masks / "cell0_mask.png").unlink()
    code = main(["data", "import", "other", "--images", str(images), "--masks", str(masks), "--data-root", root])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fsmeta: error:") and "cell0.png" in err and "Traceback" not in err


def test_small_support_images_shrink_the_crop(tmp_path):
    images, masks = _pair_folders(tmp_path, n=2, h=40, w=48)
    s = load_folder(images, masks)
    index, note = support_crop_index(s, 256, 30, 360)
    assert index.size == 40 and "40×40 crops" in note and len(index) > 0
    index, note = support_crop_index(s, 32, 8, 10)
    assert index.size == 32 and note == ""
    assert list_images(images) == sorted(images.iterdir())


def test_a_pool_folder_of_images_and_masks_gives_its_unannotated_images_only(tmp_path):
    from fsmeta.config import load_config
    from fsmeta.workflows import _pool_images

    rng = np.random.default_rng(7)
    pictures = {n: rng.integers(0, 256, (16, 16), dtype=np.uint8) for n in ("a_img", "b", "c")}
    for n, img in pictures.items():
        _png(tmp_path / "pool" / f"{n}.png", img)
    _png(tmp_path / "pool" / "a_masks.png", np.full((16, 16), 255, np.uint8))
    _png(tmp_path / "pool" / "c_mask.png", np.full((16, 16), 255, np.uint8))
    got = _pool_images(load_config(None, ["finetune.holdout=0.2"]), tmp_path / "pool", {"a_img"}, seed=0)
    # a_img is a support image, the two masks are masks: b and c remain, in name order
    assert len(got) == 2 and all(np.array_equal(g, pictures[n]) for g, n in zip(got, ("b", "c")))  # 8-bit kept as is

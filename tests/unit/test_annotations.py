"""Annotations drawn in Fiji (ImageJ ROI sets), QuPath (GeoJSON) or Cellpose (_seg.npy) as masks: the fill
rule by hand, fsmeta's own ROI output read back exactly, every ROI kind, stacks, and the error for each bad file."""

import json
import zipfile

import numpy as np
import pytest
import roifile
import tifffile
from PIL import Image
from roifile import ROI_TYPE, ImagejRoi
from scipy import ndimage

from fsmeta.data.io import import_folder, load_folder, read_npy_mask
from fsmeta.data.store import open_store
from fsmeta.errors import DataError
from fsmeta.predict import PredictSettings, predict_files
from fsmeta.data.annotations import _Shape, fill_shapes, read_annotation
from fsmeta.rois import write_rois
from tests.conftest import brightness_model


def _rect(name, left, top, right, bottom, **kw):
    return ImagejRoi(roitype=ROI_TYPE.RECT, left=left, top=top, right=right, bottom=bottom, name=name, **kw)


def _polygon(name, points, position=None):
    roi = ImagejRoi.frompoints(points, name=name, position=position)
    roi.roitype = ROI_TYPE.POLYGON
    return roi


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


# ---------------------------------------------------------------- the fill rule, by hand


def test_a_pixel_is_inside_when_its_centre_is():
    # Triangle (0,0), (4,0), (0,4): centres (c+½, r+½) with x + y < 4 → 3, 2, 1 pixels in rows 0, 1, 2;
    # row 0's centre (3.5, 0.5) lies exactly on the hypotenuse and the top-left rule leaves it out.
    tri = fill_shapes([_Shape("t", [np.array([[0, 0], [4, 0], [0, 4]], float)])], 5, 5)
    assert tri.sum() == 6 and tri[0].tolist() == [1, 1, 1, 0, 0] and tri[1, :3].tolist() == [1, 1, 0]
    # A rectangle on pixel edges x 2–6, y 1–4 is exactly rows 1–3, columns 2–5.
    box = fill_shapes([_Shape("b", [np.array([[2, 1], [6, 1], [6, 4], [2, 4]], float)])], 6, 8)
    expected = np.zeros((6, 8), np.uint8)
    expected[1:4, 2:6] = 1
    assert np.array_equal(box, expected)
    # Ellipse in the box 0–4: centres within radius 2 of (2, 2) — all 16 but the 4 corners (distance² 4.5).
    disc = fill_shapes([_Shape("o", [], box=(0, 0, 4, 4))], 4, 4)
    assert disc.sum() == 12 and disc[0, 0] == disc[3, 3] == 0
    # Two rings of one shape fill even-odd (a hole); two shapes fill as their union.
    ring = _Shape("r", [np.array([[0, 0], [6, 0], [6, 6], [0, 6]], float), np.array([[2, 2], [4, 2], [4, 4], [2, 4]], float)])
    assert fill_shapes([ring], 6, 6).sum() == 32
    assert fill_shapes([ring, _Shape("plug", [np.array([[2, 2], [4, 2], [4, 4], [2, 4]], float)])], 6, 6).sum() == 36
    # Outlines past the image's edge are cut at it.
    assert fill_shapes([_Shape("b", [np.array([[-3, -3], [2, -3], [2, 2], [-3, 2]], float)])], 4, 4).sum() == 4


def test_fsmetas_own_outlines_read_back_as_the_cells_they_outline(tmp_path):
    rng = np.random.default_rng(3)
    for t in range(12):
        cells = ndimage.binary_fill_holes(ndimage.binary_opening(rng.random((40, 52)) < 0.45))
        labels, _ = ndimage.label(cells, structure=np.ones((3, 3)))  # touching, one-pixel and diagonal cells
        for path in write_rois(tmp_path, f"t{t}", [labels], ["imagej", "geojson"]):
            assert np.array_equal(read_annotation(path, 40, 52)[0], cells.astype(np.uint8)), path.name


# ---------------------------------------------------------------- ImageJ ROI kinds and stacks


def test_rectangle_oval_polygon_and_composite_rois(tmp_path):
    composite = _rect("ring", 0, 0, 6, 6)
    path = [0, 0, 0, 1, 6, 0, 1, 6, 6, 1, 0, 6, 4, 0, 2, 2, 1, 4, 2, 1, 4, 4, 1, 2, 4, 4]
    composite.multi_coordinates, composite.shape_roi_size = np.array(path, np.float32), len(path)
    rois = [_rect("box", 10, 1, 14, 4), ImagejRoi(roitype=ROI_TYPE.OVAL, left=0, top=10, right=4, bottom=14, name="oval"),
            _polygon("tri", [[10, 10], [14, 10], [10, 14]]), composite]
    roifile.roiwrite(tmp_path / "set.zip", rois, mode="w")
    mask = read_annotation(tmp_path / "set.zip", 16, 16)[0]
    assert mask[1:4, 10:14].all() and mask[0:5, 9:15].sum() == 12      # the box
    assert mask[10:14, 0:4].sum() == 12 and mask[10, 0] == 0           # the oval, corners out
    assert mask[10:14, 10:14].sum() == 6                                # the triangle
    assert mask[0:6, 0:6].sum() == 32 and not mask[2:4, 2:4].any()      # the composite's hole
    assert mask.sum() == 12 + 12 + 6 + 32
    roifile.roiwrite(tmp_path / "one.roi", rois[0])  # a single .roi file
    assert read_annotation(tmp_path / "one.roi", 16, 16)[0].sum() == 12


def test_a_composite_of_ovals_drawn_with_curves(tmp_path):
    """Fiji's composite of an oval is a path of cubic Bézier segments (Java's Ellipse2D): a disc of radius 6
    at (8, 8) with a 4×4 square cut out, filled as the true disc less the square."""
    k = 0.5522847498 * 6
    cx = cy = 8.0
    path = [0, cx + 6, cy,
            3, cx + 6, cy + k, cx + k, cy + 6, cx, cy + 6,
            3, cx - k, cy + 6, cx - 6, cy + k, cx - 6, cy,
            3, cx - 6, cy - k, cx - k, cy - 6, cx, cy - 6,
            3, cx + k, cy - 6, cx + 6, cy - k, cx + 6, cy, 4,
            0, 6, 6, 1, 10, 6, 1, 10, 10, 1, 6, 10, 4]
    roi = _rect("disc less a square", 2, 2, 14, 14)
    roi.multi_coordinates, roi.shape_roi_size = np.array(path, np.float32), len(path)
    roifile.roiwrite(tmp_path / "c.roi", roi)
    expected = fill_shapes([_Shape("disc", [], box=(2, 2, 14, 14))], 16, 16)
    expected[6:10, 6:10] = 0
    assert np.array_equal(read_annotation(tmp_path / "c.roi", 16, 16)[0], expected)
    roi.multi_coordinates = np.array(path[:-6], np.float32)  # cut inside a LINETO
    roi.shape_roi_size = len(path) - 6
    roifile.roiwrite(tmp_path / "cut.roi", roi)
    with pytest.raises(DataError, match=r"cut.roi: ROI 'disc less a square' is a composite ROI whose path ends in the middle"):
        read_annotation(tmp_path / "cut.roi", 16, 16)


def test_a_stacks_rois_go_to_their_pages(tmp_path):
    rois = [_polygon("a", [[1, 1], [5, 1], [5, 5], [1, 5]], position=0), _polygon("b", [[8, 8], [10, 8], [10, 10], [8, 10]], position=1),
            _polygon("c", [[0, 0], [2, 0], [2, 2], [0, 2]], position=1)]
    roifile.roiwrite(tmp_path / "stack.zip", rois, mode="w")
    first, second = read_annotation(tmp_path / "stack.zip", 12, 12, pages=2)
    assert first.sum() == 16 and first[1:5, 1:5].all()
    assert second.sum() == 8 and second[8:10, 8:10].all() and second[0:2, 0:2].all()
    with pytest.raises(DataError, match=r"stack.zip: ROI 'b' is on stack position 2, but image.tif is a single image"):
        read_annotation(tmp_path / "stack.zip", 12, 12, pages=1, image="image.tif")


def test_a_roi_without_a_page_on_a_stack_and_a_page_beyond_it_are_named(tmp_path):
    roifile.roiwrite(tmp_path / "flat.zip", [_polygon("cell-7", [[1, 1], [5, 1], [5, 5]])], mode="w")
    with pytest.raises(DataError, match=r"flat.zip: ROI 'cell-7' has no stack position, and s.tif has 3 pages"):
        read_annotation(tmp_path / "flat.zip", 8, 8, pages=3, image="s.tif")
    roifile.roiwrite(tmp_path / "deep.zip", [_polygon("x", [[1, 1], [5, 1], [5, 5]], position=4)], mode="w")
    with pytest.raises(DataError, match=r"deep.zip: ROI 'x' is on stack position 5, but s.tif has 3 pages"):
        read_annotation(tmp_path / "deep.zip", 8, 8, pages=3, image="s.tif")


# ---------------------------------------------------------------- GeoJSON as QuPath writes it


def test_geojson_polygons_holes_multipolygons_and_quPaths_bare_list(tmp_path):
    square = [[0, 0], [6, 0], [6, 6], [0, 6], [0, 0]]
    hole = [[2, 2], [4, 2], [4, 4], [2, 4], [2, 2]]
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square, hole]}, "properties": {"objectType": "annotation"}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[[[8, 8], [10, 8], [10, 10], [8, 10], [8, 8]]],
                                                                                [[[8, 0], [9, 0], [9, 1], [8, 1], [8, 0]]]]}},
        {"type": "Feature", "geometry": None},  # allowed by GeoJSON: outlines nothing
    ]
    (tmp_path / "list.json").write_text(json.dumps(features))  # QuPath 0.2's export: a bare list
    (tmp_path / "fc.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    for name in ("list.json", "fc.geojson"):
        mask = read_annotation(tmp_path / name, 12, 12)[0]
        assert mask.sum() == 32 + 4 + 1 and not mask[2:4, 2:4].any() and mask[8:10, 8:10].all() and mask[0, 8] == 1


def test_quPaths_region_classes_are_skipped_and_a_region_sized_outline_warns(tmp_path, caplog):
    def feature(ring, cls=None):
        props = {"objectType": "annotation", **({"classification": {"name": cls}} if cls else {})}
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": props}

    everything = [[0, 0], [20, 0], [20, 20], [0, 20], [0, 0]]
    cell = [[2, 2], [5, 2], [5, 5], [2, 5], [2, 2]]
    (tmp_path / "a.geojson").write_text(json.dumps([feature(everything, "Region*"), feature(cell, "Tumor"),
                                                     feature(everything, "Ignore*")]))
    assert read_annotation(tmp_path / "a.geojson", 20, 20)[0].sum() == 9
    (tmp_path / "b.geojson").write_text(json.dumps([feature(everything), feature(cell)]))
    with caplog.at_level("WARNING"):
        assert read_annotation(tmp_path / "b.geojson", 20, 20, image="b.png")[0].sum() == 400
    assert "b.geojson: feature 0 outlines 100% of b.png; fsmeta fills every outline as cells" in caplog.text
    assert "feature 1" not in caplog.text


@pytest.mark.parametrize("content, message", [
    ('{"type": "FeatureCollection", "features": [', r"bad.geojson is not valid JSON \(line 1, column 44: Expecting value\)"),
    ('{"type": "Topology"}', r"bad.geojson is JSON but neither GeoJSON nor COCO"),
    ('[{"type": "Feature", "properties": {"name": "seed"}, "geometry": {"type": "Point", "coordinates": [3, 3]}}]',
     r"bad.geojson: feature 0 \(seed\) is a Point, which outlines no area"),
    ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}]',
     r"bad.geojson: feature 0 has malformed Polygon coordinates"),
    ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[50, 50], [60, 50], [60, 60], [50, 60]]]}}]',
     r"bad.geojson: feature 0 lies wholly outside img.png \(12×12; the outline spans x 50–60, y 50–60\)"),
])
def test_bad_geojson_is_named(tmp_path, content, message):
    (tmp_path / "bad.geojson").write_text(content)
    with pytest.raises(DataError, match=message):
        read_annotation(tmp_path / "bad.geojson", 12, 12, image="img.png")


def test_bad_roi_sets_are_named(tmp_path):
    line = ImagejRoi.frompoints([[1, 1], [5, 5]], name="scale bar")
    line.roitype = ROI_TYPE.LINE
    roifile.roiwrite(tmp_path / "line.zip", [_rect("ok", 0, 0, 2, 2), line], mode="w")
    with pytest.raises(DataError, match=r"line.zip: ROI 'scale bar' is a straight line, which outlines no area"):
        read_annotation(tmp_path / "line.zip", 8, 8)
    with zipfile.ZipFile(tmp_path / "mixed.zip", "w") as zf:
        zf.writestr("notes.txt", "hello")
    with pytest.raises(DataError, match=r"mixed.zip is a zip but not an ImageJ ROI set: it holds notes.txt"):
        read_annotation(tmp_path / "mixed.zip", 8, 8)
    with zipfile.ZipFile(tmp_path / "damaged.zip", "w") as zf:
        zf.writestr("cell.roi", b"Iout" + b"\x00" * 10)
    with pytest.raises(DataError, match=r"damaged.zip: ROI 'cell.roi' is not a readable ImageJ ROI"):
        read_annotation(tmp_path / "damaged.zip", 8, 8)
    (tmp_path / "truncated.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DataError, match=r"truncated.zip is not a readable zip file"):
        read_annotation(tmp_path / "truncated.zip", 8, 8)
    roifile.roiwrite(tmp_path / "far.zip", [_rect("cell-0001", 100, 100, 110, 110)], mode="w")
    with pytest.raises(DataError, match=r"far.zip: ROI 'cell-0001' lies wholly outside a.png \(8×8"):
        read_annotation(tmp_path / "far.zip", 8, 8, image="a.png")
    # A zip made by macOS's Compress carries __MACOSX/._ entries: skipped.
    with zipfile.ZipFile(tmp_path / "mac.zip", "w") as zf:
        zf.writestr("cells/a.roi", _rect("a", 0, 0, 2, 2).tobytes())
        zf.writestr("__MACOSX/cells/._a.roi", b"\x00\x05\x16\x07")
    assert read_annotation(tmp_path / "mac.zip", 8, 8)[0].sum() == 4


def test_geojson_on_a_stack_is_refused(tmp_path):
    (tmp_path / "s.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(DataError, match=r"s.geojson is GeoJSON, which outlines one plane, but s.tif has 2 pages"):
        read_annotation(tmp_path / "s.geojson", 8, 8, pages=2, image="s.tif")


# ---------------------------------------------------------------- folders: a lab's annotations as masks


def test_predicted_rois_corrected_in_fiji_come_back_as_masks(tmp_path):
    """The loop a lab runs: predict --rois imagej, correct the ROIs in Fiji (here: delete one cell, draw one),
    then fine-tune on the images with the ROI folder as the masks."""

    yy, xx = np.mgrid[:64, :64]
    cells = np.zeros((64, 64), bool)
    for cy, cx in [(16, 16), (16, 44), (46, 30)]:
        cells |= (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
    images = tmp_path / "images"
    _png(images / "a.png", cells.astype(np.uint8) * 200)
    tifffile.imwrite(images / "s.tif", np.stack([cells, cells.T]).astype(np.uint8) * 255, photometric="minisblack")
    out = tmp_path / "predicted"
    predict_files(brightness_model(), sorted(images.iterdir()), out, PredictSettings(tile=64, overlap=16, rois=("imagej",)), progress=False)
    predicted = {"a": np.asarray(Image.open(out / "labels" / "a.png")) > 0}
    assert np.array_equal(predicted["a"], cells)

    # "Corrected in Fiji": cell-0001 deleted, a 4×3 rectangle drawn; saved over the set.
    kept = [r for r in roifile.roiread(out / "rois" / "a.zip") if r.name != "cell-0001"]
    gone = [r for r in roifile.roiread(out / "rois" / "a.zip") if r.name == "cell-0001"][0]
    (out / "rois" / "a.zip").unlink()
    roifile.roiwrite(out / "rois" / "a.zip", [*kept, _rect("drawn", 2, 58, 6, 61)], mode="w")
    expected = cells.copy()
    expected[_filled(gone, 64, 64)] = False
    expected[58:61, 2:6] = True

    support = load_folder(images, out / "rois")
    assert support.ids == ["a", "s-p000", "s-p001"]
    assert np.array_equal(support.masks[0], expected.astype(np.uint8))
    assert np.array_equal(support.masks[1], cells.astype(np.uint8)) and np.array_equal(support.masks[2], cells.T.astype(np.uint8))


def _filled(roi, h, w):
    return fill_shapes([_Shape("x", [np.asarray(roi.coordinates(), float)])], h, w).astype(bool)


def test_fiji_layout_roi_sets_beside_their_images(tmp_path):
    folder = tmp_path / "lab"
    rng = np.random.default_rng(1)
    for name in ("cell01", "cell02"):
        _png(folder / f"{name}.png", rng.integers(0, 256, (16, 20), dtype=np.uint8))
    roifile.roiwrite(folder / "cell01.zip", [_rect("a", 1, 1, 5, 5)], mode="w")
    roifile.roiwrite(folder / "cell02_RoiSet.zip", [_rect("b", 10, 2, 12, 8)], mode="w")
    import_folder(tmp_path / "data", "lab", folder, folder)
    s = open_store(tmp_path / "data", "lab")
    assert s.ids == ["cell01", "cell02"] and [int(m.sum()) for m in s.masks] == [16, 12]
    assert s.masks[1][2:8, 10:12].all()
    # Fiji's default file name pairs with nothing, and the error says what to do.
    (folder / "cell02_RoiSet.zip").rename(folder / "RoiSet.zip")
    with pytest.raises(DataError, match=r"1 mask\(s\) without an image: RoiSet.zip; RoiSet.zip is Fiji's default name"):
        load_folder(folder, folder)


def test_a_mask_folder_of_annotations_and_images_together(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    for name in ("a", "b", "c"):
        _png(images / f"{name}.png", np.zeros((12, 12), np.uint8))
    masks.mkdir()
    roifile.roiwrite(masks / "a.zip", [_rect("r", 0, 0, 3, 3)], mode="w")
    (masks / "b.geojson").write_text(json.dumps({"type": "Feature", "geometry": {
        "type": "Polygon", "coordinates": [[[4, 4], [8, 4], [8, 8], [4, 8], [4, 4]]]}}))
    mask_c = np.zeros((12, 12), np.uint8)
    mask_c[10:, 10:] = 255
    _png(masks / "c_mask.png", mask_c)
    support = load_folder(images, masks)
    assert [int(m.sum()) for m in support.masks] == [9, 16, 4]
    (masks / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"holds file\(s\) that are not TIFF, PNG, JPEG or BMP images, NumPy masks, "
                                        r"ImageJ ROI sets, GeoJSON/COCO files or ImageScope XML: notes.txt"):
        load_folder(images, masks)


# ---------------------------------------------------------------- Cellpose's files


def _cellpose_seg(path, masks):
    """A _seg.npy as Cellpose's io.masks_flows_to_seg and GUI write it: a pickled dict of arrays, lists, strings
    and NumPy scalars (the keys of Cellpose 3/4)."""
    np.save(path, {
        "outlines": np.zeros_like(masks), "masks": masks, "chan_choose": [0, 0], "ismanual": np.zeros(int(masks.max()), bool),
        "filename": str(path).replace("_seg.npy", ".png"), "flows": [np.zeros((1, *masks.shape[-2:], 3), np.uint8), [],
                                                                   np.zeros((3, *masks.shape[-2:]), np.float32)],
        "diameter": np.nan, "est_diam": np.float64(17.5), "colors": np.zeros((3, 3), np.int64), "zdraw": [],
        "normalize_params": {"lowhigh": None, "percentile": [1.0, 99.0]}, "model_path": 0,
    })


def test_cellpose_folders_as_they_are(tmp_path):
    """Cellpose's GUI folder (000_img.png + 000_img_seg.npy) and its save_masks output (001_cp_masks.png)."""
    gui = tmp_path / "gui"
    labels = np.zeros((16, 20), np.uint16)
    labels[2:6, 3:9], labels[9:14, 10:18] = 1, 2
    _png(gui / "000_img.png", np.full((16, 20), 90, np.uint8))
    _cellpose_seg(gui / "000_img_seg.npy", labels)
    support = load_folder(gui, gui)
    assert support.ids == ["000_img"] and np.array_equal(support.masks[0], (labels > 0).astype(np.uint8))
    saved = tmp_path / "saved"
    _png(saved / "images" / "001.png", np.full((16, 20), 90, np.uint8))
    _png(saved / "masks" / "001_cp_masks.png", labels.astype(np.uint8))
    assert np.array_equal(load_folder(saved / "images", saved / "masks").masks[0], (labels > 0).astype(np.uint8))


def test_plain_npy_masks_and_a_stack(tmp_path):
    stack = np.zeros((2, 10, 12), np.int32)
    stack[0, 1:3, 1:3], stack[1, 5:9, 5:9] = 7, 1
    np.save(tmp_path / "s.npy", stack)
    planes = read_npy_mask(tmp_path / "s.npy")
    assert len(planes) == 2 and [int((p > 0).sum()) for p in planes] == [4, 16]
    np.save(tmp_path / "f.npy", stack.astype(np.float32))
    with pytest.raises(DataError, match=r"f.npy holds a float32 array of shape \(2, 10, 12\); a mask is a 2-D array"):
        read_npy_mask(tmp_path / "f.npy")
    (tmp_path / "cut.npy").write_bytes((tmp_path / "s.npy").read_bytes()[:140])
    with pytest.raises(DataError, match=r"cut.npy is not a readable .npy file"):
        read_npy_mask(tmp_path / "cut.npy")
    np.save(tmp_path / "d.npy", {"outlines": stack})
    with pytest.raises(DataError, match=r"d.npy holds pickled objects but no Cellpose 'masks' entry"):
        read_npy_mask(tmp_path / "d.npy")


class _Payload:
    """Unpickled by pickle.load, this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_seg_npy_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    np.save(tmp_path / "evil_seg.npy", {"masks": np.ones((8, 8), np.uint16), "x": _Payload(marker)})
    with pytest.raises(DataError, match=r"evil_seg.npy holds a Python object of class (posix|os|nt).system that fsmeta does not load"):
        read_npy_mask(tmp_path / "evil_seg.npy")
    assert not marker.exists()

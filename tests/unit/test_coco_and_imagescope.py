"""COCO instance annotations (CVAT, Label Studio, Roboflow, LIVECell) and Aperio ImageScope XML (MoNuSeg,
pathology labs) as masks: run-length masks against strings pycocotools wrote, polygons by the pixel-centre
rule, outlines traced by skimage read back exactly, pairing by file name, and the error for each bad file."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from fsmeta.cli import main
from fsmeta.data import annotations
from fsmeta.data.annotations import coco_index, read_annotation
from fsmeta.data.io import import_folder, load_folder
from fsmeta.data.store import open_store
from fsmeta.errors import DataError

# Written by pycocotools 2.0 (mask.encode of a Fortran-ordered array) for the masks the tests build by hand.
SMALL_RLE = "01<2G000f0N"  # 6×9: rows 1–3 × columns 2–4, pixel (5, 8) and pixel (0, 0)
DISCS_RLE = ("T14T10000000000000UO3;MC7;ID9;GE9;GD;;EE;;EE;;EE;;EE;;EE;;EE;;EF9;GE9;GF7;IG3;M`000000D5[OKd07[OIc0?00O1O100000"
             "000000000001O1O002H[OIf05[OKQ100000\\1")  # 40×50: two discs and a bar, 670 pixels


def _small():
    m = np.zeros((6, 9), np.uint8)
    m[1:4, 2:5] = 1
    m[5, 8] = m[0, 0] = 1
    return m


def _discs():
    yy, xx = np.mgrid[:40, :50]
    return ((((yy - 12) ** 2 + (xx - 15) ** 2) < 64) | (((yy - 28) ** 2 + (xx - 35) ** 2) < 100)
            | ((yy >= 36) & (xx < 48))).astype(np.uint8)


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _coco(path, images, annotations_, categories=({"id": 1, "name": "cell"},)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations_, "categories": list(categories)}))
    return path


def _image(id_, name, h, w):
    return {"id": id_, "file_name": name, "height": h, "width": w}


def _ann(id_, image_id, segmentation, **kw):
    return {"id": id_, "image_id": image_id, "category_id": 1, "segmentation": segmentation, **kw}


# ---------------------------------------------------------------- decoding, against pycocotools and by hand


def test_run_length_masks_decode_as_pycocotools_encoded_them(tmp_path):
    coco = _coco(tmp_path / "a.json", [_image(1, "small.png", 6, 9), _image(2, "discs.png", 40, 50)],
                 [_ann(1, 1, {"size": [6, 9], "counts": SMALL_RLE}), _ann(2, 2, {"size": [40, 50], "counts": DISCS_RLE})])
    (small,) = read_annotation(coco, 6, 9, image="small.png")
    assert np.array_equal(small, _small())
    (discs,) = read_annotation(coco, 40, 50, image="/anywhere/discs.png")
    assert discs.sum() == 670 and np.array_equal(discs, _discs())


def test_uncompressed_counts_run_down_the_columns(tmp_path):
    # 3×4, column-major: 1 background, 2 foreground (column 0 rows 1–2), 4 background, 3 foreground (column 2
    # row 1 … column 3 row 0), 2 background.
    coco = _coco(tmp_path / "a.json", [_image(7, "x.png", 3, 4)],
                 [_ann(1, 7, {"size": [3, 4], "counts": [1, 2, 4, 3, 2]}, iscrowd=1)])
    (mask,) = read_annotation(coco, 3, 4, image="x.png")
    assert mask.tolist() == [[0, 0, 0, 1], [1, 0, 1, 0], [1, 0, 1, 0]]


def test_polygons_fill_by_the_pixel_centre_as_pycocotools_rasterises_them(tmp_path):
    # pycocotools' own rasterisation of these two polygons (frPyObjects + decode) gives exactly these pixels.
    rect, tri = [1, 1, 5, 1, 5, 4, 1, 4], [0, 0, 8, 0, 0, 6]
    coco = _coco(tmp_path / "a.json", [_image(1, "r.png", 6, 9), _image(2, "t.png", 6, 9)],
                 [_ann(1, 1, [rect]), _ann(2, 2, [tri])])
    (r,) = read_annotation(coco, 6, 9, image="r.png")
    expected = np.zeros((6, 9), np.uint8)
    expected[1:4, 1:5] = 1
    assert np.array_equal(r, expected)
    (t,) = read_annotation(coco, 6, 9, image="t.png")
    assert t.sum(axis=1).tolist() == [7, 6, 5, 3, 2, 1] and t[:, 0].all()


def test_an_objects_parts_and_overlapping_objects_are_a_union(tmp_path):
    # One object in two overlapping polygons and a second object over both: union, not even-odd.
    a, b = [0, 0, 4, 0, 4, 4, 0, 4], [2, 2, 6, 2, 6, 6, 2, 6]
    coco = _coco(tmp_path / "a.json", [_image(1, "u.png", 8, 8)],
                 [_ann(1, 1, [a, b]), _ann(2, 1, {"size": [8, 8], "counts": [0, 64]})])
    (mask,) = read_annotation(coco, 8, 8, image="u.png")
    assert mask.all()
    coco = _coco(tmp_path / "b.json", [_image(1, "u.png", 8, 8)], [_ann(1, 1, [a, b])])
    (mask,) = read_annotation(coco, 8, 8, image="u.png")
    assert mask.sum() == 16 + 16 - 4


# ---------------------------------------------------------------- folders as the tools export them


def _cells(tmp_path, names):
    """Images with bright squares and the COCO entries outlining them (mixed polygons and RLE)."""
    images, anns, want = [], [], {}
    for k, name in enumerate(names):
        img = np.full((20, 30), 10, np.uint8)
        mask = np.zeros((20, 30), np.uint8)
        x = 3 + 4 * k
        img[2:8, x:x + 5] = 200
        mask[2:8, x:x + 5] = 1
        _png(tmp_path / "imgs" / name, img)
        images.append(_image(k + 1, f"project/images/{name}" if k % 2 else name, 20, 30))
        if k % 2:
            anns.append(_ann(10 + k, k + 1, [[x, 2, x + 5, 2, x + 5, 8, x, 8]]))
        else:
            flat = mask.T.ravel()
            edges = np.flatnonzero(np.diff(np.r_[0, flat, 0]))
            counts = np.diff(np.r_[0, edges, flat.size]).tolist()
            anns.append(_ann(10 + k, k + 1, {"size": [20, 30], "counts": counts}))
        want[name.rsplit(".", 1)[0]] = mask
    return images, anns, want


def test_a_coco_file_annotates_a_folder_and_imports(tmp_path):
    images, anns, want = _cells(tmp_path, ["a.png", "b.png", "c.png"])
    images.append(_image(99, "not-copied.png", 20, 30))  # listed, not in the folder: fine
    coco = _coco(tmp_path / "export" / "annotations" / "instances_default.json", images, anns)
    for masks in (coco, coco.parent):  # the file itself, or CVAT's annotations/ folder holding it alone
        support = load_folder(tmp_path / "imgs", masks, colour="grey")
        assert support.ids == ["a", "b", "c"]
        for ident, mask in zip(support.ids, support.masks):
            assert np.array_equal(mask, want[ident])
    assert main(["data", "import", "lab", "--images", str(tmp_path / "imgs"), "--masks", str(coco),
                 "--data-root", str(tmp_path / "data")]) == 0
    store = open_store(tmp_path / "data", "lab")
    assert [np.array_equal(store.masks[i], want[store.ids[i]]) for i in range(3)] == [True] * 3


def test_roboflows_layout_the_coco_file_among_the_images(tmp_path):
    images, anns, want = _cells(tmp_path, ["a.png", "b.png"])
    _coco(tmp_path / "imgs" / "_annotations.coco.json", images, anns)
    support = load_folder(tmp_path / "imgs", tmp_path / "imgs", colour="grey")
    assert support.ids == ["a", "b"] and all(np.array_equal(m, want[i]) for i, m in zip(support.ids, support.masks))
    path = import_folder(tmp_path / "data", "rf", tmp_path / "imgs", tmp_path / "imgs" / "_annotations.coco.json", colour="grey")
    assert open_store(path.parent, "rf").ids == ["a", "b"]


def test_label_studios_upload_names_pair_with_the_original_files(tmp_path):
    # Label Studio lists an upload "a.png" as "/data/upload/3/8e4b2a1c-a.png"; a name listed as it is wins.
    images, anns, want = _cells(tmp_path, ["a.png", "b.png"])
    images[0]["file_name"] = "/data/upload/3/8e4b2a1c-a.png"
    images[1]["file_name"] = "\\data\\upload\\3\\0badcafe-b.png"
    support = load_folder(tmp_path / "imgs", _coco(tmp_path / "ls.json", images, anns), colour="grey")
    assert all(np.array_equal(m, want[i]) for i, m in zip(support.ids, support.masks))
    exact = _image(50, "a.png", 20, 30)
    index = coco_index(_coco(tmp_path / "both.json", images + [exact], anns))
    assert index.entry("a.png")["id"] == 50 and index.entry("b.png")["id"] == 2


def test_a_coco_file_is_parsed_once_for_the_check_and_the_reading(tmp_path, monkeypatch):
    images, anns, _ = _cells(tmp_path, ["a.png", "b.png", "c.png"])
    coco = _coco(tmp_path / "c.json", images, anns)
    calls = []
    real = annotations._load_json
    monkeypatch.setattr(annotations, "_load_json", lambda p: calls.append(p) or real(p))
    annotations._coco_index.cache_clear()
    load_folder(tmp_path / "imgs", coco, colour="grey")
    assert calls == [coco.resolve()]
    # A changed file is read again.
    _coco(coco.parent / "c.json", images, anns[:2])
    os.utime(coco, ns=(coco.stat().st_atime_ns, coco.stat().st_mtime_ns + 10**9))
    assert len(coco_index(coco).annotations) == 2 and len(calls) == 2


# ---------------------------------------------------------------- bad files, named


def test_images_the_coco_file_does_not_list_are_named(tmp_path):
    images, anns, _ = _cells(tmp_path, ["a.png", "b.png", "c.png"])
    coco = _coco(tmp_path / "c.json", images[:1], anns[:1])
    with pytest.raises(DataError, match=r"c\.json annotates no image named b\.png, c\.png \(2 of the 3"):
        load_folder(tmp_path / "imgs", coco, colour="grey")


@pytest.mark.parametrize("entry, ann, message", [
    (_image(1, "a.png", 40, 30), _ann(5, 1, [[0, 0, 4, 0, 4, 4]]), r"gives a\.png as 30×40, but the image is 30×20; were the annotations made on a resized"),
    (_image(1, "a.png", 20, 30), {"id": 5, "image_id": 1, "bbox": [1, 1, 3, 3]}, r"annotation 5 of a\.png has no segmentation \(a bounding box only\)"),
    (_image(1, "a.png", 20, 30), _ann(5, 1, []), r"annotation 5 of a\.png has no segmentation"),
    (_image(1, "a.png", 20, 30), _ann(5, 1, [[0, 0, 4, 0, 4]]), r"annotation 5 of a\.png has a malformed polygon"),
    (_image(1, "a.png", 20, 30), _ann(5, 1, [[50, 50, 60, 50, 60, 60]]), r"annotation 5 of a\.png, polygon 0 lies wholly outside a\.png"),
    (_image(1, "a.png", 20, 30), _ann(5, 1, {"size": [30, 20], "counts": [600]}), r"run-length mask of 20×30, but the image is 30×20"),
    (_image(1, "a.png", 20, 30), _ann(5, 1, {"size": [20, 30], "counts": [599]}), r"run lengths cover 599 pixels, but a 30×20 image has 600"),
    (_image(1, "a.png", 20, 30), _ann(5, 1, {"size": [20, 30], "counts": "0 1"}), r"a character ' ' that a compressed RLE string does not hold"),
    (_image(1, "a.png", 20, 30), _ann(5, 1, {"size": [20, 30], "counts": "0P"}), r"ends in the middle of a count"),
    (_image(1, "a.png", 20, 30), _ann(5, 1, {"size": [20, 30], "counts": [-1, 601]}), r"RLE counts that are not non-negative integers"),
])
def test_bad_coco_entries_are_named(tmp_path, entry, ann, message):
    _png(tmp_path / "imgs" / "a.png", np.zeros((20, 30), np.uint8))
    coco = _coco(tmp_path / "c.json", [entry], [ann])
    with pytest.raises(DataError, match=message):
        load_folder(tmp_path / "imgs", coco, colour="grey")


def test_bad_coco_files_are_named(tmp_path):
    _png(tmp_path / "imgs" / "a.png", np.zeros((20, 30), np.uint8))
    twice = _coco(tmp_path / "twice.json", [_image(1, "x/a.png", 20, 30), _image(2, "y/A.png", 20, 30)], [])
    with pytest.raises(DataError, match=r"lists 2 images named a\.png \(ids 1, 2\)"):
        load_folder(tmp_path / "imgs", twice, colour="grey")
    geo = tmp_path / "g.json"
    geo.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(DataError, match=r"g\.json is not a COCO file"):
        load_folder(tmp_path / "imgs", geo, colour="grey")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"file_name": "a.png"}], "annotations": []}))
    with pytest.raises(DataError, match=r"images\[0\] is not a COCO image record"):
        load_folder(tmp_path / "imgs", bad, colour="grey")
    # A COCO file beside per-image masks: which annotates what is unclear.
    _coco(tmp_path / "masks" / "all.json", [_image(1, "a.png", 20, 30)], [])
    _png(tmp_path / "masks" / "a_mask.png", np.zeros((20, 30), np.uint8))
    with pytest.raises(DataError, match=r"all\.json is a COCO file, which annotates many images, but it lies beside 1 other"):
        load_folder(tmp_path / "imgs", tmp_path / "masks", colour="grey")


def test_an_image_without_annotations_warns_naming_it(tmp_path, caplog):
    _png(tmp_path / "imgs" / "a.png", np.zeros((20, 30), np.uint8))
    coco = _coco(tmp_path / "c.json", [_image(1, "a.png", 20, 30)], [])
    support = load_folder(tmp_path / "imgs", coco, colour="grey")
    assert not support.masks[0].any()
    assert "holds no annotation of a.png" in caplog.text and "c.json's mask of a.png has no foreground" in caplog.text


# ---------------------------------------------------------------- Aperio ImageScope XML (MoNuSeg's layout)


def _imagescope(path, regions):
    """An ImageScope file: ``regions`` = [(type, [(x, y), ...], negative)]."""
    body = "".join(
        f'<Region Id="{k + 1}" Type="{t}" NegativeROA="{int(neg)}"><Attributes/><Vertices>'
        + "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in pts) + "</Vertices></Region>"
        for k, (t, pts, neg) in enumerate(regions))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('<?xml version="1.0" encoding="UTF-8"?>\n<Annotations MicronsPerPixel="0.25"><Annotation Id="1" '
                    f'Name="nuclei" Type="4"><Regions><RegionAttributeHeaders/>{body}</Regions></Annotation></Annotations>')
    return path


def test_imagescope_polygons_rectangles_ellipses_and_negative_regions(tmp_path):
    xml = _imagescope(tmp_path / "a.xml", [
        ("0", [(1, 1), (5, 1), (5, 4), (1, 4)], False),    # rows 1–3 × columns 1–4
        ("1", [(10, 0), (14, 0), (14, 4), (10, 4)], False),  # a rectangle region: rows 0–3 × columns 10–13
        ("0", [(11, 1), (13, 1), (13, 3), (11, 3)], True),   # cut out of it: rows 1–2 × columns 11–12
        ("2", [(0, 6), (4, 10)], False),                     # an ellipse in the box 0–4 × 6–10: 12 pixels (the corners out)
    ])
    (mask,) = read_annotation(xml, 12, 16, image="a.tif")
    want = np.zeros((12, 16), np.uint8)
    want[1:4, 1:5] = 1
    want[0:4, 10:14] = 1
    want[1:3, 11:13] = 0
    disc = np.ones((4, 4), np.uint8)
    disc[0, 0] = disc[0, 3] = disc[3, 0] = disc[3, 3] = 0
    want[6:10, 0:4] = disc
    assert np.array_equal(mask, want)


def test_imagescope_outlines_of_real_looking_cells_read_back_exactly(tmp_path):
    # Blobs → their contours through the pixel centres (skimage's find_contours at 0.5, as converters write
    # MoNuSeg-style files) → ImageScope XML → the same pixels.
    from skimage import measure

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:64, :80]
    truth = np.zeros((64, 80), bool)
    for _ in range(12):
        cy, cx, ry, rx = rng.uniform(6, 58), rng.uniform(6, 74), rng.uniform(2, 7), rng.uniform(2, 7)
        truth |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    labels = measure.label(truth)
    regions = []
    for r in range(1, labels.max() + 1):
        for c in measure.find_contours(np.pad(labels == r, 1).astype(float), 0.5):
            regions.append(("0", [(x - 0.5, y - 0.5) for y, x in c], False))  # pad offset −1, pixel centre +0.5
    _png(tmp_path / "Tissue Images" / "TCGA-1.png", (truth * 200).astype(np.uint8))
    _imagescope(tmp_path / "Annotations" / "TCGA-1.xml", regions)
    support = load_folder(tmp_path / "Tissue Images", tmp_path / "Annotations", colour="grey")
    assert np.array_equal(support.masks[0], truth.astype(np.uint8))


@pytest.mark.parametrize("content, message", [
    ('<Annotations><Annotation Id="1"><Regions><Region Id="3" Type="4"><Vertices><Vertex X="1" Y="1"/><Vertex X="5" Y="5"/>'
     '</Vertices></Region></Regions></Annotation></Annotations>', r"annotation 1, region 3 is a ruler \(a line\), which outlines no area"),
    ('<Annotations><Annotation Id="1"><Regions><Region Id="3" Type="0"><Vertices><Vertex X="a" Y="1"/></Vertices></Region>'
     '</Regions></Annotation></Annotations>', r"region 3 has a vertex without numeric X and Y"),
    ('<Annotations><Annotation Id="1"><Regions><Region Id="3" Type="0"><Vertices><Vertex X="100" Y="100"/><Vertex X="110" Y="100"/>'
     '<Vertex X="110" Y="110"/></Vertices></Region></Regions></Annotation></Annotations>', r"region 3 lies wholly outside a\.tif"),
    ('<annotation><object><bndbox/></object></annotation>', r"not an Aperio ImageScope annotation \(its root is <annotation>"),
    ('<Annotations><Annotation>', r"not well-formed XML"),
    ('<?xml version="1.0"?><!DOCTYPE lol [<!ENTITY a "aaaa">]><Annotations>&a;</Annotations>', r"declares a DOCTYPE or entities"),
])
def test_bad_imagescope_files_are_named(tmp_path, content, message):
    (tmp_path / "a.xml").write_text(content)
    with pytest.raises(DataError, match=message):
        read_annotation(tmp_path / "a.xml", 20, 30, image="a.tif")


# ---------------------------------------------------------------- one mask per object (Data Science Bowl 2018)


def _nuclei(n, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:24, :32]
    objects = [(((yy - rng.uniform(4, 20)) ** 2 + (xx - rng.uniform(4, 28)) ** 2) < rng.uniform(4, 16)).astype(np.uint8) * 255
               for _ in range(n)]
    return objects, np.any(objects, axis=0).astype(np.uint8) if objects else np.zeros((24, 32), np.uint8)


def test_the_data_science_bowl_layout_imports_as_it_is_unpacked(tmp_path):
    root, want = tmp_path / "stage1_train", {}
    for k, (case, n) in enumerate([("0a7d30b252", 3), ("1b9c2f44e0", 5), ("2c00ffee11", 0)]):
        objects, union = _nuclei(n, k)
        rgba = np.dstack([np.full((24, 32), 30, np.uint8)] * 3 + [np.full((24, 32), 255, np.uint8)])  # DSB's images are RGBA
        _png(root / case / "images" / f"{case}.png", rgba)
        (root / case / "masks").mkdir(parents=True)
        for j, obj in enumerate(objects):
            _png(root / case / "masks" / f"{j:04d}.png", obj)
        want[case] = union
    support = load_folder(root, root, colour="grey")
    assert support.ids == sorted(want) and all(np.array_equal(m, want[i]) for i, m in zip(support.ids, support.masks))
    assert int(support.masks[2].sum()) == 0  # a case without nuclei: an empty mask
    # The same nuclei as a folder per image beside a flat image folder.
    for case in want:
        _png(tmp_path / "flat" / f"{case}.png", np.full((24, 32), 30, np.uint8))
    objects_root = tmp_path / "objects"
    for case in want:
        (objects_root / f"{case}_masks").mkdir(parents=True)
        for f in sorted((root / case / "masks").iterdir()):
            (objects_root / f"{case}_masks" / f.name).write_bytes(f.read_bytes())
    flat = load_folder(tmp_path / "flat", objects_root, colour="grey")
    assert all(np.array_equal(m, want[i]) for i, m in zip(flat.ids, flat.masks))


def test_object_mask_folders_that_do_not_fit_are_named(tmp_path):
    root = tmp_path / "dsb"
    objects, _ = _nuclei(2, 0)
    _png(root / "a" / "images" / "a.png", np.zeros((24, 32), np.uint8))
    _png(root / "a" / "masks" / "0.png", objects[0])
    _png(root / "a" / "masks" / "1.png", objects[1][:20])
    with pytest.raises(DataError, match=r"1\.png is 32×20 but its image is 32×24"):
        load_folder(root, root, colour="grey")
    (root / "a" / "masks" / "1.png").unlink()
    (root / "a" / "masks" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"holds notes\.txt, which are not mask images"):
        load_folder(root, root, colour="grey")
    (root / "a" / "masks" / "notes.txt").unlink()
    _png(root / "a" / "images" / "a2.png", np.zeros((24, 32), np.uint8))
    with pytest.raises(DataError, match=r"images holds 2 images; in this layout it holds its case's one image"):
        load_folder(root, root, colour="grey")
    (root / "a" / "images" / "a2.png").unlink()
    (root / "stray").mkdir()
    with pytest.raises(DataError, match=r"hold\(s\) no images/ and masks/ folders"):
        load_folder(root, root, colour="grey")

import numpy as np
import pytest

from fsmeta.data.store import Record, list_stores, open_store, write_store
from fsmeta.errors import DataError


def _records(n=3, h=20, w=30, dtype="uint8"):
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 256, (h, w), dtype=np.uint8) if dtype == "uint8" else rng.random((h, w), dtype=np.float32)
        mask = (rng.random((h, w)) > 0.7).astype(np.uint8)
        yield Record(f"img{i}", img, mask, "train", f"file{i}.png")


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_round_trip_is_exact_and_memory_mapped(tmp_path, dtype):
    recs = list(_records(dtype=dtype))
    write_store(tmp_path, "toy", iter(recs), kind="imported", image_dtype=dtype)
    s = open_store(tmp_path, "toy")
    assert s.ids == ["img0", "img1", "img2"] and s.sources[1] == "file1.png"
    for rec, img, mask in zip(recs, s.images, s.masks):
        assert np.array_equal(img, rec.image) and np.array_equal(mask, rec.mask)
        assert not img.flags.writeable  # a view into the memory map, not a copy
    expected = recs[0].image.astype(np.float32) / 255 if dtype == "uint8" else recs[0].image
    assert np.allclose(s.image(0), expected)
    fg = sum(r.mask.sum() for r in recs) / sum(r.mask.size for r in recs)
    assert s.foreground_fraction() == pytest.approx(fg)
    (meta,) = list_stores(tmp_path)
    assert meta["images"] == 3 and meta["foreground_fraction"] == pytest.approx(fg)


def test_failed_write_leaves_no_partial_store_and_keeps_the_old_one(tmp_path):
    write_store(tmp_path, "toy", _records(2), kind="imported")
    bad = list(_records(3))
    bad[2] = Record("img2", bad[2].image, np.zeros((5, 5), np.uint8), "train", "masks/img2.png")
    with pytest.raises(DataError, match=r"masks/img2.png: mask is 5×5 but image is 30×20"):
        write_store(tmp_path, "toy", iter(bad), kind="imported")
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]
    assert len(open_store(tmp_path, "toy")) == 2


@pytest.mark.parametrize(
    "record,message",
    [
        (Record("a", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)), "single-channel"),
        (Record("a", np.zeros((4, 4), np.uint8), np.full((4, 4), 2, np.uint8)), "values 0/1"),
        (Record("a", np.zeros((4, 4), np.uint16), np.zeros((4, 4), np.uint8)), "dtype uint16"),
    ],
)
def test_bad_records_are_named(tmp_path, record, message):
    with pytest.raises(DataError, match=message):
        write_store(tmp_path, "toy", [record], kind="imported")


def test_duplicate_ids_and_empty_sets_are_rejected(tmp_path):
    rec = next(_records(1))
    with pytest.raises(DataError, match="duplicate image id 'img0'"):
        write_store(tmp_path, "toy", [rec, rec], kind="imported")
    with pytest.raises(DataError, match="has no images"):
        write_store(tmp_path, "toy", [], kind="imported")
    assert list(tmp_path.iterdir()) == []


def test_missing_and_corrupt_stores_are_named(tmp_path):
    with pytest.raises(DataError, match="'nothere' is not prepared"):
        open_store(tmp_path, "nothere")
    write_store(tmp_path, "toy", _records(1), kind="imported")
    (tmp_path / "toy" / "store.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match="store.arrow is not a readable fsmeta store"):
        open_store(tmp_path, "toy")

"""The five public preparers on files generated here in each public format (small counts and
shapes), their integrity checks, and the resumable download against a local HTTP server."""

import http.server
import logging
import os
import re
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from fsmeta.cli import main
from fsmeta.data import prepare as prep
from fsmeta.data.prepare import download, prepare, shrunk
from fsmeta.data.store import open_store
from fsmeta.errors import DataError

H, W = 24, 40  # every generated image; the real sets are checked in tests/integration/test_realdata.py


def _blobs(rng, h=H, w=W):
    """An image with bright blobs and the matching mask, so a test can tell whether pairs match."""
    mask = np.zeros((h, w), bool)
    for _ in range(3):
        cy, cx, r = rng.integers(4, h - 4), rng.integers(4, w - 4), rng.integers(2, 5)
        yy, xx = np.ogrid[:h, :w]
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    image = np.where(mask, 200, 40).astype(np.uint8) + rng.integers(0, 10, (h, w), dtype=np.uint8)
    return image, mask


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _tif(path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array, **kw)


def make_b5(base: Path, n_counts=3) -> int:
    """BBBC005 layout: every focus level in images/, ground truth only for F1 — interleaved names,
    so pairing by sorted position would go wrong."""
    rng = np.random.default_rng(5)
    n = 0
    for c in range(1, n_counts + 1):
        for f in (1, 4, 7):
            for stain in (1, 2):
                name = f"SIMCEPImages_A{c:02d}_C{c * 7}_F{f}_s{c:02d}_w{stain}.TIF"
                image, mask = _blobs(rng)
                _tif(base / "BBBC005_v1_images" / name, image)
                if f == 1:
                    _tif(base / "BBBC005_v1_ground_truth" / name, (mask * 255).astype(np.uint8))
                    n += 1
    return n


def make_b39(base: Path, n=4):
    rng = np.random.default_rng(39)
    for i in range(n):
        name = f"IXMtest_A{i + 2:02d}_s{i + 1}_w1{'0123456789ABCDEF'[i]}51DCA89-7B4E-4D1C-98A5-D4D2CB8A4BD9"
        _, mask = _blobs(rng)
        image = (300 + mask * 2500 + rng.integers(0, 50, (H, W))).astype(np.uint16)  # far from 65535
        _tif(base / "images" / f"{name}.tif", image)
        rgba = np.zeros((H, W, 4), np.uint8)
        rgba[..., 3] = 255
        from scipy import ndimage

        labels, _ = ndimage.label(mask)
        rgba[..., 0] = (labels * 37) % 256
        rgba[..., 1] = labels
        _png(base / "masks" / f"{name}.png", rgba)


def make_sstem(base: Path, n=4):
    rng = np.random.default_rng(7)
    stack = base / "groundtruth-drosophila-vnc-master" / "stack1"
    for i in range(n):
        image, mask = _blobs(rng)
        _tif(stack / "raw" / f"{i:02d}.tif", image)
        m = (mask * 255).astype(np.uint8)
        m[0, :5] = [1, 5, 60, 127, 100]  # stray values below the "> 127" line
        if i == 1:
            (stack / "mitochondria").mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).convert("1").save(stack / "mitochondria" / f"{i:02d}.png")  # a 1-bit mask, as in the real set
        else:
            _png(stack / "mitochondria" / f"{i:02d}.png", m)


def make_em(base: Path, n=5):
    rng = np.random.default_rng(11)
    pairs = [_blobs(rng) for _ in range(n)]
    _tif(base / "training.tif", np.stack([p[0] for p in pairs]), compression="zlib", photometric="minisblack")
    _tif(base / "training_groundtruth.tif", np.stack([(p[1] * 255).astype(np.uint8) for p in pairs]), photometric="minisblack")


def make_tnbc(base: Path):
    rng = np.random.default_rng(3)
    top = base / "TNBC_NucleiSegmentation"
    for slide, count in ((1, 2), (2, 2), (10, 1)):
        for k in range(1, count + 1):
            image, mask = _blobs(rng)
            rgb = np.stack([image, (image * 0.5).astype(np.uint8), 255 - image], -1)
            if slide != 2:  # most slides are RGBA, some RGB
                rgb = np.concatenate([rgb, np.full((H, W, 1), 255, np.uint8)], -1)
            _png(top / f"Slide_{slide:02d}" / f"{slide:02d}_{k}.png", rgb)
            _png(top / f"GT_{slide:02d}" / f"{slide:02d}_{k}.png", (mask * 255).astype(np.uint8))
    return 5


SPECS = {
    "b5": shrunk("b5", pairs=6, shape=(H, W)),
    "b39": shrunk("b39", pairs=4, shape=(H, W)),
    "sstem": shrunk("sstem", pairs=4, shape=(H, W)),
    "em": shrunk("em", pairs=5, shape=(H, W)),
    "tnbc": shrunk("tnbc", pairs=5, shape=(H, W)),
}
MAKERS = {"b5": make_b5, "b39": make_b39, "sstem": make_sstem, "em": make_em, "tnbc": make_tnbc}


@pytest.mark.parametrize("name", list(SPECS))
def test_each_public_format_prepares(tmp_path, name):
    MAKERS[name](tmp_path / "dl")
    prepare(name, tmp_path / "data", tmp_path / "dl", spec=SPECS[name], progress=False)
    s = open_store(tmp_path / "data", name)
    assert len(s) == SPECS[name].pairs and s.meta["kind"] == "public"
    prov = s.meta["provenance"]
    assert prov["pairs"] == SPECS[name].pairs and prov["source"] and prov["citation"]
    assert all(sp == "train" for sp in s.splits)
    for img, mask in zip(s.images, s.masks):
        assert img.shape == (H, W) and set(np.unique(mask)) <= {0, 1} and mask.any()
        # the generated images are bright exactly where their own mask is set: pairs match
        x = img.astype(np.float32) / (255 if img.dtype == np.uint8 else 1)
        assert x[mask == 1].mean() > x[mask == 0].mean() + 0.3


def test_b5_takes_only_in_focus_images_paired_by_name(tmp_path):
    n = make_b5(tmp_path / "dl")
    prepare("b5", tmp_path / "data", tmp_path / "dl", spec=SPECS["b5"], progress=False)
    s = open_store(tmp_path / "data", "b5")
    assert n == 6 and all("_F1_" in i for i in s.ids) and s.images[0].dtype == np.uint8


def test_b39_16bit_scaled_by_own_range_and_instance_masks_binary(tmp_path):
    make_b39(tmp_path / "dl")
    prepare("b39", tmp_path / "data", tmp_path / "dl", spec=SPECS["b39"], progress=False)
    s = open_store(tmp_path / "data", "b39")
    raw = tifffile.imread(sorted((tmp_path / "dl" / "images").iterdir())[0]).astype(np.float64)
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    assert s.meta["image_dtype"] == "float32" and np.allclose(s.images[0], expected, atol=1e-6)
    assert s.images[0].max() == 1.0  # not raw / 65535, not clipped at 8 bits


def test_b39_official_split_when_metadata_present(tmp_path):
    make_b39(tmp_path / "dl")
    stems = sorted(p.stem for p in (tmp_path / "dl" / "images").iterdir())
    meta = tmp_path / "dl" / "metadata"
    meta.mkdir()
    (meta / "training.txt").write_text("\n".join(f"{s}.png" for s in stems[:2]) + "\n")
    (meta / "validation.txt").write_text(f"{stems[2]}.png\n")
    (meta / "test.txt").write_text(f"{stems[3]}.png\n")
    prepare("b39", tmp_path / "data", tmp_path / "dl", spec=SPECS["b39"], progress=False)
    s = open_store(tmp_path / "data", "b39")
    assert s.splits == ["train", "train", "val", "test"]


def test_sstem_threshold_above_127_and_1bit_masks(tmp_path):
    make_sstem(tmp_path / "dl")
    prepare("sstem", tmp_path / "data", tmp_path / "dl", spec=SPECS["sstem"], progress=False)
    s = open_store(tmp_path / "data", "sstem")
    assert all(m[0, :5].sum() == 0 for m in s.masks)  # stray 1..127 values are background
    assert s.masks[1].any()  # the 1-bit mask is not read as empty


def test_wrong_count_names_the_folder(tmp_path):
    make_tnbc(tmp_path / "dl")
    with pytest.raises(DataError, match=r"expected 50 image/mask pairs in .*TNBC_NucleiSegmentation, found 5; is the download complete\?"):
        prepare("tnbc", tmp_path / "data", tmp_path / "dl", progress=False)
    assert not (tmp_path / "data" / "tnbc").exists()


def test_missing_mask_is_named(tmp_path):
    make_tnbc(tmp_path / "dl")
    os.remove(tmp_path / "dl" / "TNBC_NucleiSegmentation" / "GT_02" / "02_2.png")
    with pytest.raises(DataError, match=r"Slide_02 vs GT_02: .*1 image\(s\) without a mask: 02_2.png"):
        prepare("tnbc", tmp_path / "data", tmp_path / "dl", spec=SPECS["tnbc"], progress=False)


def test_wrong_shape_and_depth_are_named_and_nothing_is_written(tmp_path):
    make_b39(tmp_path / "dl")
    images = sorted((tmp_path / "dl" / "images").iterdir())
    tifffile.imwrite(images[1], np.zeros((H, W), np.uint8))  # 8-bit where 16-bit is expected
    tifffile.imwrite(images[3], np.zeros((H + 2, W), np.uint16))
    root = tmp_path / "data"
    with pytest.raises(DataError) as err:
        prepare("b39", root, tmp_path / "dl", spec=SPECS["b39"], progress=False)
    msg = str(err.value)
    assert "2 of 4 pair(s) are wrong, nothing was written" in msg
    assert f"{images[1].name} is 8-bit; BBBC039 U2OS nuclei (fluorescence) images are 16-bit" in msg
    assert f"{images[3].name} is {W}×{H + 2}, expected {W}×{H}" in msg
    assert list(root.iterdir()) == []  # no store, no temporary folder


def test_failed_prepare_keeps_the_previous_store(tmp_path):
    make_em(tmp_path / "dl")
    root = tmp_path / "data"
    prepare("em", root, tmp_path / "dl", spec=SPECS["em"], progress=False)
    stack = tifffile.imread(tmp_path / "dl" / "training_groundtruth.tif")
    tifffile.imwrite(tmp_path / "dl" / "training_groundtruth.tif", stack[:4], photometric="minisblack")
    with pytest.raises(DataError, match=r"training_groundtruth.tif has 4 slices but .*training.tif has 5"):
        prepare("em", root, tmp_path / "dl", spec=SPECS["em"], progress=False)
    assert len(open_store(root, "em")) == 5 and sorted(p.name for p in root.iterdir()) == ["em"]


def test_corrupt_file_mid_stream_aborts_the_store(tmp_path):
    make_sstem(tmp_path / "dl")
    raw = tmp_path / "dl" / "groundtruth-drosophila-vnc-master" / "stack1" / "raw" / "02.tif"
    raw.write_bytes(raw.read_bytes()[:100])
    with pytest.raises(DataError, match=r"02.tif is not a readable TIFF \(corrupt or truncated\)|02.tif is truncated"):
        prepare("sstem", tmp_path / "data", tmp_path / "dl", spec=SPECS["sstem"], progress=False)
    assert list((tmp_path / "data").iterdir()) == []


def test_not_the_download(tmp_path):
    (tmp_path / "dl").mkdir()
    with pytest.raises(DataError, match=r"does not hold the EPFL CA1 .* download: no training.tif found"):
        prepare("em", tmp_path / "data", tmp_path / "dl", progress=False)


def test_from_a_folder_of_zip_archives(tmp_path):
    make_tnbc(tmp_path / "unzipped")
    (tmp_path / "zips").mkdir()
    _zip_tree(tmp_path / "unzipped", tmp_path / "zips" / "TNBC_NucleiSegmentation.zip")
    prepare("tnbc", tmp_path / "data", tmp_path / "zips", spec=SPECS["tnbc"], progress=False)
    assert len(open_store(tmp_path / "data", "tnbc")) == 5


# ---------------------------------------------------------------- download


def _zip_tree(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    return archive


class _Server:
    """Files of one folder over HTTP on 127.0.0.1, with Range requests; can cut the first
    response of a file short to imitate a dropped connection."""

    def __init__(self, folder: Path, cut_first: int | None = None):
        self.folder, self.cut_first, self.requests = folder, cut_first, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = outer.folder / self.path.lstrip("/").split("?")[0]
                outer.requests.append((self.path, self.headers.get("Range")))
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                rng = self.headers.get("Range")
                start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng else 0
                if start >= len(data) and rng:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                body = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                first = sum(1 for p, _ in outer.requests if p == self.path) == 1
                if outer.cut_first and first:
                    self.wfile.write(body[: outer.cut_first])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # drop the connection mid-file
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served_tnbc(tmp_path):
    make_tnbc(tmp_path / "src")
    (tmp_path / "www").mkdir()
    _zip_tree(tmp_path / "src", tmp_path / "www" / "TNBC_NucleiSegmentation.zip")
    servers = []

    def start(cut_first=None):
        s = _Server(tmp_path / "www", cut_first)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def test_download_resumes_with_range_and_prepares(tmp_path, served_tnbc):
    server = served_tnbc(cut_first=3000)
    root = tmp_path / "data"
    with pytest.raises(DataError, match=r"run the same command again to resume"):
        prepare("tnbc", root, download_files=True, mirror=server.url, spec=SPECS["tnbc"], progress=False)
    part = root / ".downloads" / "tnbc" / "TNBC_NucleiSegmentation.zip.part"
    assert part.stat().st_size == 3000 and not (root / "tnbc").exists()
    prepare("tnbc", root, download_files=True, mirror=server.url, spec=SPECS["tnbc"], progress=False)
    assert server.requests[-1][1] == "bytes=3000-"  # the second request continued the partial file
    assert len(open_store(root, "tnbc")) == 5 and not part.exists()
    meta = open_store(root, "tnbc").meta["provenance"]
    assert meta["downloaded"] is True


def test_download_rejects_a_corrupt_archive(tmp_path, served_tnbc):
    server = served_tnbc()
    archive = tmp_path / "www" / "TNBC_NucleiSegmentation.zip"
    data = bytearray(archive.read_bytes())
    data[200:260] = b"\x00" * 60  # damage a member's compressed bytes
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"TNBC_NucleiSegmentation.zip \(downloaded to .*\)(: member .* fails its CRC check| is not a valid zip archive)"):
        download(f"{server.url}/TNBC_NucleiSegmentation.zip", tmp_path / "dl" / "TNBC_NucleiSegmentation.zip")
    assert list((tmp_path / "dl").iterdir()) == []  # neither the file nor a partial one is kept


def test_download_http_error_names_the_url(tmp_path, served_tnbc):
    server = served_tnbc()
    with pytest.raises(DataError, match=r"download of http://127.0.0.1:\d+/missing.zip failed: HTTP 404"):
        download(f"{server.url}/missing.zip", tmp_path / "missing.zip")


def test_cli_prepare(tmp_path, capsys, monkeypatch, caplog):
    make_sstem(tmp_path / "dl")
    monkeypatch.setitem(prep.PUBLIC, "sstem", SPECS["sstem"])
    root = str(tmp_path / "data")
    with caplog.at_level(logging.INFO):
        assert main(["data", "prepare", "sstem", "--from", str(tmp_path / "dl"), "--data-root", root]) == 0
    assert "sstem: 4 images" in capsys.readouterr().out
    assert main(["data", "prepare", "sstem", "--from", str(tmp_path / "dl"), "--data-root", root]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "prepare", "sstem", "--data-root", root, "--replace"]) == 2
    assert "exactly one of --from PATH" in capsys.readouterr().err


# ---------------------------------------------------------------- checksums (issue 16, defect 6)


def _digests(top: Path) -> dict[str, str]:
    import hashlib

    return {p.relative_to(top).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(top.rglob("*")) if p.is_file()}


def test_the_public_data_sets_record_member_checksums():
    from fsmeta.data.checksums import AUTHORITATIVE, MEMBER_SHA256

    assert len(MEMBER_SHA256["tnbc"]) == 100 and len(MEMBER_SHA256["sstem"]) == 40 and len(MEMBER_SHA256["em"]) == 2
    assert AUTHORITATIVE == {"tnbc", "sstem"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", d) for table in MEMBER_SHA256.values() for d in table.values())


def test_a_tampered_archive_from_a_mirror_is_refused_by_its_members(tmp_path, served_tnbc):
    """The zip unpacks (its CRCs are its own), but a member differs from the recorded digest."""
    genuine = _digests(tmp_path / "src" / "TNBC_NucleiSegmentation")
    spec = shrunk("tnbc", pairs=5, shape=(H, W), member_sha256=genuine)
    bad = tmp_path / "src" / "TNBC_NucleiSegmentation" / "GT_01" / "01_1.png"
    _png(bad, np.zeros((H, W), np.uint8))  # an attacker's (or a broken mirror's) mask
    _zip_tree(tmp_path / "src", tmp_path / "www" / "TNBC_NucleiSegmentation.zip")
    server = served_tnbc()
    root = tmp_path / "data"
    with pytest.raises(DataError, match=r"GT_01/01_1.png has sha256 [0-9a-f]{64}, expected " + genuine["GT_01/01_1.png"]):
        prepare("tnbc", root, download_files=True, mirror=server.url, spec=spec, progress=False)
    assert not (root / "tnbc").exists()


def test_verified_members_are_recorded_and_unknown_ones_said_plainly(tmp_path, caplog):
    make_tnbc(tmp_path / "src")
    top = tmp_path / "src" / "TNBC_NucleiSegmentation"
    known = _digests(top)
    del known["Slide_10/10_1.png"]
    spec = shrunk("tnbc", pairs=5, shape=(H, W), member_sha256=known)
    with caplog.at_level(logging.WARNING):
        prepare("tnbc", tmp_path / "data", tmp_path / "src", spec=spec, progress=False)
    assert open_store(tmp_path / "data", "tnbc").meta["provenance"]["verified_files"] == 9
    assert "no known checksum for 1 file(s), not verified: Slide_10/10_1.png" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a data set with no record at all (BBBC005, BBBC039)
        prepare("tnbc", tmp_path / "data2", tmp_path / "src", spec=SPECS["tnbc"], progress=False)
    assert "no checksums are known for this data set's files" in caplog.text


def test_an_unrecorded_em_copy_warns_instead_of_failing(tmp_path, caplog):
    """The recorded EM digests are of a re-encoded copy; the public original is not known."""
    make_em(tmp_path / "src")
    spec = shrunk("em", pairs=5, shape=(H, W), member_sha256={"training.tif": "0" * 64, "training_groundtruth.tif": "0" * 64})
    with caplog.at_level(logging.WARNING):
        prepare("em", tmp_path / "data", tmp_path / "src", spec=spec, progress=False)
    assert "match no recorded checksum" in caplog.text and "training.tif" in caplog.text

"""Annotations drawn in Fiji, QuPath or other tools as masks: ImageJ ROI sets, GeoJSON outlines, Aperio
ImageScope XML and COCO instance annotations filled at their image's size.

A lab's annotations drawn in Fiji or QuPath are masks as they stand, so a folder of masks may hold
``.zip``/``.roi`` ROI sets, ``.geojson``/``.json`` files and ImageScope ``.xml`` files
(:data:`ANNOTATION_SUFFIXES`) instead of mask images (:mod:`fsmeta.data.io` pairs them). One COCO
JSON file (the instance-segmentation export of CVAT, Label Studio, Roboflow and of data sets such
as LIVECell) annotates many images: its polygons and run-length masks are read for the image whose
file name it lists (:func:`coco_index`). Every area outline is filled at the paired image's size; a
pixel is foreground when its centre lies inside an outline (ImageJ's own rule, and pycocotools';
the top-left rule decides a centre exactly on an edge), holes of composite ROIs and GeoJSON
interior rings stay background, and the union of the outlines is the mask. So a ROI set that
``fsmeta predict --rois`` wrote (:mod:`fsmeta.rois`), corrected in Fiji and saved, goes back to
``fsmeta finetune --support-masks`` as it is.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from fsmeta.errors import DataError

log = logging.getLogger(__name__)

# Annotation files a mask folder may hold instead of mask images (read by :func:`read_annotation`).
IMAGEJ_SUFFIXES = (".zip", ".roi")
GEOJSON_SUFFIXES = (".geojson", ".json")
XML_SUFFIXES = (".xml",)  # Aperio ImageScope annotations (MoNuSeg's layout)
ANNOTATION_SUFFIXES = IMAGEJ_SUFFIXES + GEOJSON_SUFFIXES + XML_SUFFIXES
_MAX_ROI_BYTES = 64 * 2**20  # one ROI of a set; a larger member is not an outline a person drew
_MAX_JSON_BYTES = 512 * 2**20


def _shoelace(rc: np.ndarray) -> float:
    y, x = rc[:, 0], rc[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2.0


@dataclass
class _Shape:
    """One outline to fill: ``rings`` filled even-odd together (a hole is a ring inside another), or an
    ellipse inscribed in ``box`` (x0, y0, x1, y1); ``page`` 0-based, or None where the file gives none."""

    name: str
    rings: list[np.ndarray]
    box: tuple[float, float, float, float] | None = None
    page: int | None = None
    negative: bool = False  # cut out of the mask (ImageScope's negative regions), not filled

    def area(self) -> float:
        """The area inside (px²): the ellipse's, or the rings' even-odd area (largest ring less the others)."""
        if self.box is not None:
            return math.pi * (self.box[2] - self.box[0]) * (self.box[3] - self.box[1]) / 4
        areas = sorted((_shoelace(r[:, ::-1]) for r in self.rings if len(r) > 2), reverse=True)
        return areas[0] - sum(areas[1:]) if areas else 0.0

    def bounds(self) -> tuple[float, float, float, float]:
        if self.box is not None:
            return self.box
        xy = np.concatenate(self.rings)
        return float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), float(xy[:, 1].max())


def is_annotation(path: str | Path) -> bool:
    """Whether a file is an ImageJ ROI set, a GeoJSON/COCO file or ImageScope XML by its suffix (:data:`ANNOTATION_SUFFIXES`)."""
    return Path(path).suffix.lower() in ANNOTATION_SUFFIXES


def read_annotation(path: str | Path, height: int, width: int, pages: int = 1, image: str = "the image") -> list[np.ndarray]:
    """The binary masks (one (H, W) uint8 {0, 1} per page) that an annotation file outlines.

    ``path`` is an ImageJ ROI set (``.zip``) or single ROI (``.roi``), a GeoJSON file
    (``.geojson``/``.json``: a FeatureCollection, a list of Features as QuPath 0.2 writes,
    a Feature or a bare geometry), an Aperio ImageScope annotation (``.xml``, as MoNuSeg ships
    its outlines: polygon, rectangle and ellipse regions; negative regions cut out), or a COCO
    file (``.json``: its entry for the file named as ``image``, :func:`coco_index`). Area
    outlines only: polygon, freehand, traced,
    rectangle, oval and composite ROIs; GeoJSON Polygon and MultiPolygon (and
    GeometryCollections of them). For an image of several pages every ROI must carry its
    stack position (Fiji's ROI Manager does when the ROI is added on that slice); a GeoJSON
    file outlines one plane. Raises :class:`DataError` naming the file (and the ROI or
    feature) for an unreadable file, a line or point outline, a page the image lacks, or
    an outline lying wholly outside the ``width``×``height`` ``image`` (the set of another image).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix in IMAGEJ_SUFFIXES:
        shapes = list(_imagej_shapes(path))
    elif suffix in GEOJSON_SUFFIXES:
        index = _coco_or_none(path)  # COCO files are read once for all the images they annotate
        kind = "GeoJSON" if index is None else "COCO"
        if pages > 1:
            raise DataError(f"{path} is {kind}, which outlines one plane, but {image} has {pages} pages; give an "
                            "ImageJ ROI set whose ROIs carry their stack positions, or one image per page")
        if index is not None:
            return [_coco_mask(index, image, height, width)]
        shapes = list(_geojson_shapes(path, _load_json(path)))
    elif suffix in XML_SUFFIXES:
        if pages > 1:
            raise DataError(f"{path} is an ImageScope annotation, which outlines one plane, but {image} has {pages} pages")
        shapes = list(_imagescope_shapes(path))
    else:
        raise DataError(f"{path} is not an annotation file fsmeta reads ({', '.join(ANNOTATION_SUFFIXES)})")
    by_page: list[list[_Shape]] = [[] for _ in range(pages)]
    for shape in shapes:
        _check_inside(shape, path, image, height, width)
        page = shape.page
        if pages == 1:
            if page not in (None, 0):
                raise DataError(f"{path}: {shape.name} is on stack position {page + 1}, but {image} is a single image")
            page = 0
        elif page is None:
            raise DataError(f"{path}: {shape.name} has no stack position, and {image} has {pages} pages, so which page "
                            "it outlines is unknown (in Fiji, add each ROI to the ROI Manager while its slice is shown, "
                            "so that it records the slice; or give one image per page)")
        elif page >= pages:
            raise DataError(f"{path}: {shape.name} is on stack position {page + 1}, but {image} has {pages} pages")
        if not shape.negative and shape.area() > 0.5 * height * width:
            log.warning("%s: %s outlines %.0f%% of %s; fsmeta fills every outline as cells, so a region drawn around "
                        "the cells (a QuPath parent annotation, say) makes that whole region foreground", path, shape.name,
                        100 * shape.area() / (height * width), image)
        by_page[page].append(shape)
    return [_fill_page(page_shapes, height, width) for page_shapes in by_page]


def _check_inside(shape: _Shape, path: Path, image: str, height: int, width: int) -> None:
    """An outline lying wholly outside its ``width``×``height`` image is an error naming both."""
    x0, y0, x1, y1 = shape.bounds()
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise DataError(f"{path}: {shape.name} lies wholly outside {image} ({width}×{height}; the outline spans "
                        f"x {x0:g}–{x1:g}, y {y0:g}–{y1:g}); are these the outlines of another image?")


def _fill_page(shapes: Sequence[_Shape], height: int, width: int) -> np.ndarray:
    """The shapes filled, less those marked ``negative`` (an ImageScope negative region)."""
    mask = fill_shapes([s for s in shapes if not s.negative], height, width)
    cut = [s for s in shapes if s.negative]
    return mask & (1 - fill_shapes(cut, height, width)) if cut else mask


def fill_shapes(shapes: Sequence[_Shape], height: int, width: int) -> np.ndarray:
    """The union of the shapes' insides as a (height, width) uint8 {0, 1} mask: pixel (r, c) is inside
    when its centre (c + ½, r + ½) is (even-odd over a shape's rings; top-left rule on an edge)."""
    rows: list[np.ndarray] = []
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    for shape in shapes:
        r, a, b = _ellipse_spans(shape.box, height) if shape.box is not None else _polygon_spans(shape.rings, height)
        rows.append(r)
        starts.append(a)
        ends.append(b)
    diff = np.zeros((height, width + 1), np.int32)
    if rows:
        r = np.concatenate(rows)
        # Pixel c is inside a span [a, b) of crossings when a <= c + 1/2 < b.
        c0 = np.clip(np.ceil(np.concatenate(starts) - 0.5), 0, width).astype(np.int64)
        c1 = np.clip(np.ceil(np.concatenate(ends) - 0.5), 0, width).astype(np.int64)
        keep = c1 > c0
        np.add.at(diff, (r[keep], c0[keep]), 1)
        np.add.at(diff, (r[keep], c1[keep]), -1)
    return (np.cumsum(diff, axis=1)[:, :width] > 0).astype(np.uint8)


def _polygon_spans(rings: Sequence[np.ndarray], height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, start x, end x) of the inside spans of the rings, even-odd, at the rows' centres."""
    edges = []
    for ring in rings:
        ring = np.asarray(ring, np.float64)
        if len(ring) >= 2:
            edges.append(np.concatenate([ring, np.roll(ring, -1, axis=0)], axis=1))  # (x0, y0, x1, y1); closes the ring
    empty = np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    if not edges:
        return empty
    e = np.concatenate(edges)
    e = e[e[:, 1] != e[:, 3]]  # a horizontal edge crosses no row centre
    if not len(e):
        return empty
    x0, y0, x1, y1 = e.T
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    # Rows whose centre y = r + 1/2 lies in [lo, hi) (half-open, so a vertex shared by two edges counts once).
    r_first = np.clip(np.ceil(lo - 0.5), 0, height).astype(np.int64)
    r_stop = np.clip(np.ceil(hi - 0.5), 0, height).astype(np.int64)
    n = np.maximum(r_stop - r_first, 0)
    if not n.sum():
        return empty
    which = np.repeat(np.arange(len(e)), n)
    offsets = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    row = r_first[which] + offsets
    yc = row + 0.5
    x = x0[which] + (yc - y0[which]) * (x1[which] - x0[which]) / (y1[which] - y0[which])
    order = np.lexsort((x, row))
    row, x = row[order], x[order]
    # Within a row the crossings pair up (a closed ring crosses a row an even number of times).
    return row[0::2], x[0::2], x[1::2]


def _ellipse_spans(box: tuple[float, float, float, float], height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if rx <= 0 or ry <= 0:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    row = np.arange(max(0, math.floor(y0)), min(height, math.ceil(y1)), dtype=np.int64)
    dy = (row + 0.5 - cy) / ry
    row, dy = row[np.abs(dy) < 1], dy[np.abs(dy) < 1]
    half = rx * np.sqrt(1 - dy * dy)
    return row, cx - half, cx + half


_AREA_TYPES = {"POLYGON", "RECT", "OVAL", "FREEHAND", "TRACED"}
# QuPath's built-in classes for what is not an object: a region to analyse, a region to ignore.
_QUPATH_NOT_CELLS = {"Region*", "Ignore*"}
_NOT_AREA = {"LINE": "a straight line", "FREELINE": "a freehand line", "POLYLINE": "a segmented line",
             "ANGLE": "an angle", "POINT": "a point selection", "NOROI": "an empty ROI"}


def _imagej_shapes(path: Path) -> Iterator[_Shape]:
    import roifile

    for member, data in _roi_members(path):
        where = f"ROI {member!r}" if member else "the ROI"
        try:
            roi = roifile.ImagejRoi.frombytes(data)
        except Exception as exc:  # roifile raises ValueError/struct.error on a damaged ROI
            raise DataError(f"{path}: {where} is not a readable ImageJ ROI ({exc})") from None
        label = f"ROI {roi.name!r}" if roi.name else where
        kind = roifile.ROI_TYPE(roi.roitype).name
        subtype = roifile.ROI_SUBTYPE(roi.subtype).name
        if subtype in ("TEXT", "ARROW", "IMAGE"):
            raise DataError(f"{path}: {label} is a {subtype.lower()} overlay, not an outline; delete it from the set")
        if kind in _NOT_AREA:
            raise DataError(f"{path}: {label} is {_NOT_AREA[kind]}, which outlines no area; fsmeta reads polygon, "
                            "freehand, traced, rectangle, oval and composite ROIs (delete it from the set)")
        if not roi.composite and kind not in _AREA_TYPES:
            raise DataError(f"{path}: {label} is an ImageJ ROI of unknown type {int(roi.roitype)}")
        position = int(roi.position) or (int(roi.z_position) if not roi.t_position else
                                         int(roi.t_position) if not roi.z_position else 0)
        page = position - 1 if position > 0 else None
        if not roi.composite and kind == "OVAL":
            yield _Shape(label, [], box=(float(roi.left), float(roi.top), float(roi.right), float(roi.bottom)), page=page)
            continue
        if roi.composite:
            rings = _path_rings(np.asarray(roi.multi_coordinates, np.float64), path, label)
        else:
            rings = [np.asarray(roi.coordinates(), np.float64)]
        rings = [r for r in rings if len(r)]
        if not rings:
            raise DataError(f"{path}: {label} has no coordinates")
        yield _Shape(label, rings, page=page)


_CURVE_SEGMENTS = 16  # straight pieces per Bézier segment of a composite ROI: within 0.1 px for a 40-px cell


def _path_rings(ops: np.ndarray, path: Path, label: str) -> list[np.ndarray]:
    """The rings of a composite (shape) ROI's path, as Java's PathIterator wrote it: MOVETO (0, x, y),
    LINETO (1, x, y), QUADTO (2, 2 points), CUBICTO (3, 3 points), CLOSE (4), in image coordinates; curves
    (a composite of ovals) are flattened into :data:`_CURVE_SEGMENTS` pieces each."""
    values = ops.tolist()
    rings: list[np.ndarray] = []
    points: list[tuple[float, float]] = []
    start = (0.0, 0.0)
    t = np.linspace(0, 1, _CURVE_SEGMENTS + 1)[1:, None]
    n = 0
    try:
        while n < len(values):
            op = int(values[n])
            if op == 0:
                if len(points) > 2:
                    rings.append(np.array(points))
                start = (values[n + 1], values[n + 2])
                points = [start]
                n += 3
            elif op in (1, 2, 3):
                if not points:
                    points = [start]  # after a CLOSE a segment starts at the subpath's first point
                k = op  # points a LINETO, QUADTO, CUBICTO carries
                segment = values[n + 1:n + 1 + 2 * k]
                if len(segment) != 2 * k:
                    raise IndexError
                ctrl = np.array(segment, np.float64).reshape(k, 2)
                p0 = np.array(points[-1])
                if op == 1:
                    points.append(tuple(ctrl[0]))
                elif op == 2:
                    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl[0] + t**2 * ctrl[1]
                    points.extend(map(tuple, curve))
                else:
                    curve = (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * ctrl[0] + 3 * (1 - t) * t**2 * ctrl[1] + t**3 * ctrl[2]
                    points.extend(map(tuple, curve))
                n += 1 + 2 * k
            elif op == 4:
                if len(points) > 2:
                    rings.append(np.array(points))
                points = []
                n += 1
            else:
                raise DataError(f"{path}: {label} is a composite ROI with an unknown path command {op}")
    except IndexError:
        raise DataError(f"{path}: {label} is a composite ROI whose path ends in the middle of a segment") from None
    if len(points) > 2:
        rings.append(np.array(points))
    return rings


def _roi_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of each ROI of a set, or ("", bytes) of a single ``.roi`` file. Folders and the
    ``__MACOSX``/``._`` clutter of a zip made by macOS are skipped; any other member must be a ``.roi``."""
    if path.suffix.lower() == ".roi":
        if path.stat().st_size > _MAX_ROI_BYTES:
            raise DataError(f"{path} is {path.stat().st_size:,} bytes, too large for an ImageJ ROI")
        yield "", path.read_bytes()
        return
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX/")
                     and not Path(i.filename).name.startswith("._")]
            others = [i.filename for i in infos if not i.filename.lower().endswith(".roi")]
            if others:
                raise DataError(f"{path} is a zip but not an ImageJ ROI set: it holds {', '.join(others[:5])}"
                                + (f" and {len(others) - 5} more" if len(others) > 5 else "") + " (a ROI set holds only .roi files)")
            for info in infos:
                if info.file_size > _MAX_ROI_BYTES:
                    raise DataError(f"{path}: {info.filename} is {info.file_size:,} bytes, too large for an ImageJ ROI")
                yield info.filename, zf.read(info)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable zip file ({exc})") from None


def _load_json(path: Path) -> object:
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise DataError(f"{path} is {path.stat().st_size:,} bytes, more than fsmeta reads as GeoJSON or COCO "
                        f"({_MAX_JSON_BYTES:,}); split it")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text file, so not GeoJSON or COCO") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def _geojson_shapes(path: Path, data: object) -> Iterator[_Shape]:
    if isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise DataError(f"{path}: the FeatureCollection has no list of features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and "coordinates" in data or isinstance(data, dict) and data.get("type") == "GeometryCollection":
        features = [{"type": "Feature", "geometry": data}]
    else:
        raise DataError(f"{path} is JSON but neither GeoJSON nor COCO: expected a FeatureCollection, a list of Features, "
                        "a Feature or a geometry, or COCO's \"images\" and \"annotations\"")
    for k, feature in enumerate(features):
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise DataError(f"{path}: item {k} is not a GeoJSON Feature")
        props = feature.get("properties") if isinstance(feature.get("properties"), dict) else {}
        name = props.get("name") or feature.get("id")
        label = f"feature {k}" + (f" ({name!s})" if name else "")
        if feature.get("geometry") is None:
            continue  # GeoJSON allows a feature without a geometry: it outlines nothing
        cls = props.get("classification")
        cls = cls.get("name") if isinstance(cls, dict) else cls
        if isinstance(cls, str) and cls in _QUPATH_NOT_CELLS:
            log.info("%s: %s is classified %s, which QuPath keeps for regions, not objects; skipped", path, label, cls)
            continue
        for rings in _geometry_polygons(feature["geometry"], path, label):
            yield _Shape(label, rings)


def _geometry_polygons(geometry: object, path: Path, label: str) -> Iterator[list[np.ndarray]]:
    """The polygons (each a list of rings: exterior, then holes) of a GeoJSON geometry."""
    if not isinstance(geometry, dict):
        raise DataError(f"{path}: {label} has a geometry that is not a JSON object")
    kind = geometry.get("type")
    if kind == "GeometryCollection":
        for g in geometry.get("geometries") or []:
            yield from _geometry_polygons(g, path, label)
        return
    if kind not in ("Polygon", "MultiPolygon"):
        raise DataError(f"{path}: {label} is a {kind}, which outlines no area; fsmeta reads Polygon and MultiPolygon "
                        "outlines (delete it, or export the cells' outlines only)")
    polygons = [geometry.get("coordinates")] if kind == "Polygon" else geometry.get("coordinates")
    try:
        for polygon in polygons or []:
            rings = [np.asarray(ring, np.float64)[:, :2] for ring in polygon]
            if any(r.ndim != 2 or len(r) < 3 or not np.isfinite(r).all() for r in rings):
                raise ValueError
            if rings:
                yield rings
    except (TypeError, ValueError, IndexError):
        raise DataError(f"{path}: {label} has malformed {kind} coordinates (expected rings of [x, y] pairs)") from None


# ---------------------------------------------------------------- Aperio ImageScope XML

# ImageScope's region types: 0 polygon (freehand or clicked), 1 rectangle, 2 ellipse (two corner vertices),
# 3 arrow, 4 ruler, 5 point.
_IMAGESCOPE_AREAS = {"0": "polygon", "1": "rectangle", "2": "ellipse"}
_IMAGESCOPE_NOT_AREA = {"3": "an arrow", "4": "a ruler (a line)", "5": "a point"}


def _imagescope_shapes(path: Path) -> Iterator[_Shape]:
    """The regions of an Aperio ImageScope annotation file (``<Annotations><Annotation><Regions><Region
    Type=…><Vertices><Vertex X= Y=/>``): MoNuSeg's and pathology labs' outlines. Vertex coordinates are
    pixels of the image from its top-left corner. A document with a DOCTYPE or entity declarations is
    refused before it is parsed (no entity expansion)."""
    import xml.etree.ElementTree as ET

    if path.stat().st_size > _MAX_JSON_BYTES:
        raise DataError(f"{path} is {path.stat().st_size:,} bytes, more than fsmeta reads as an annotation file")
    text = path.read_bytes()
    if b"<!DOCTYPE" in text or b"<!ENTITY" in text:
        raise DataError(f"{path} declares a DOCTYPE or entities, which an ImageScope annotation does not; refused unread")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise DataError(f"{path} is not well-formed XML ({exc})") from None
    if root.tag != "Annotations":
        raise DataError(f"{path} is XML but not an Aperio ImageScope annotation (its root is <{root.tag}>, not "
                        "<Annotations>)")
    for a, annotation in enumerate(root.iter("Annotation")):
        layer = annotation.get("Name") or annotation.get("Id") or str(a + 1)
        for r, region in enumerate(annotation.iter("Region")):
            label = f"annotation {layer}, region {region.get('Id') or r + 1}"
            kind = region.get("Type", "0")
            if kind in _IMAGESCOPE_NOT_AREA:
                raise DataError(f"{path}: {label} is {_IMAGESCOPE_NOT_AREA[kind]}, which outlines no area; fsmeta reads "
                                "polygon, rectangle and ellipse regions (delete it)")
            if kind not in _IMAGESCOPE_AREAS:
                raise DataError(f"{path}: {label} is an ImageScope region of unknown type {kind}")
            try:
                points = np.array([[float(v.get("X")), float(v.get("Y"))] for v in region.iter("Vertex")], np.float64)
            except (TypeError, ValueError):
                raise DataError(f"{path}: {label} has a vertex without numeric X and Y") from None
            if not len(points) or not np.isfinite(points).all():
                raise DataError(f"{path}: {label} has no vertices" if not len(points) else f"{path}: {label} has a non-finite vertex")
            negative = region.get("NegativeROA", "0") == "1"
            if kind == "2":
                (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
                yield _Shape(label, [], box=(x0, y0, x1, y1), negative=negative)
            elif len(points) < 3:
                log.info("%s: %s has %d vertex(es), which outline no area; skipped", path, label, len(points))
            else:
                yield _Shape(label, [points], negative=negative)


# ---------------------------------------------------------------- COCO


def _is_coco(data: object) -> bool:
    return isinstance(data, dict) and "images" in data and "annotations" in data


_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-(.+)$")  # Label Studio stores an upload "cell01.png" as "8e4b2a1c-cell01.png"


def _file_key(name: str) -> str:
    """How an image is found in a COCO file: its file name without folders (either slash), lower-case."""
    return name.replace("\\", "/").rsplit("/", 1)[-1].lower()


@dataclass(frozen=True)
class CocoIndex:
    """A COCO file's images by file name (:func:`_file_key`) and their annotations by image id."""

    path: Path
    images: dict[str, list[dict]]
    annotations: dict[object, list[dict]]
    categories: dict[object, str]
    uploaded: dict[str, list[dict]] = field(default_factory=dict)  # Label Studio's "8e4b2a1c-cell01.png" by "cell01.png"

    def entry(self, image: str) -> dict:
        """The image record for the image file ``image`` (a path or a name): the one listed under its file
        name, else the one Label Studio listed under its upload name (its name behind 8 hex digits and a
        hyphen); an error when the file lists it not once."""
        key = _file_key(image)
        found = self.images.get(key) or self.uploaded.get(key, [])
        if not found:
            raise DataError(f"{self.path} lists no image named {Path(image).name} (it lists {len(self.images)} file "
                            "name(s); an image in the folder that the COCO file does not annotate must be moved out)")
        if len(found) > 1:
            raise DataError(f"{self.path} lists {len(found)} images named {Path(image).name} (ids "
                            f"{', '.join(str(r.get('id')) for r in found)}), so which one is meant is unknown")
        return found[0]

    def names(self) -> set[str]:
        return set(self.images) | set(self.uploaded)


def coco_index(path: str | Path) -> CocoIndex:
    """The COCO instance annotations of ``path`` (``{"images": [...], "annotations": [...], ...}``, as
    CVAT, Label Studio, Roboflow and pycocotools write it), read once and kept while the file is unchanged.
    Raises :class:`DataError` naming the file when it is not COCO or an entry is malformed."""
    index = _coco_or_none(path)
    if index is None:
        raise DataError(f"{path} is not a COCO file: expected a JSON object with \"images\" and \"annotations\"")
    return index


def _coco_or_none(path: str | Path) -> CocoIndex | None:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file")
    st = path.stat()
    return _coco_index(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _coco_index(resolved: str, mtime_ns: int, size: int) -> CocoIndex | None:
    """The index of a COCO file, or None for JSON that is not COCO (kept too, so a mask folder's GeoJSON files
    are not parsed once more to learn that); a malformed COCO file raises (and is read again next time)."""
    path = Path(resolved)
    data = _load_json(path)
    if not _is_coco(data):
        return None
    images_list, annotations_list = data["images"], data["annotations"]
    if not isinstance(images_list, list) or not isinstance(annotations_list, list):
        raise DataError(f"{path}: COCO's \"images\" and \"annotations\" must be lists")
    images: dict[str, list[dict]] = {}
    for k, record in enumerate(images_list):
        if not isinstance(record, dict) or "id" not in record or not isinstance(record.get("file_name"), str):
            raise DataError(f"{path}: images[{k}] is not a COCO image record (an object with \"id\" and \"file_name\")")
        images.setdefault(_file_key(record["file_name"]), []).append(record)
    uploaded: dict[str, list[dict]] = {}
    for key, records in images.items():
        original = _UPLOAD_PREFIX.match(key)
        if original:
            uploaded.setdefault(original.group(1), []).extend(records)
    annotations: dict[object, list[dict]] = {}
    for k, ann in enumerate(annotations_list):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise DataError(f"{path}: annotations[{k}] is not a COCO annotation (an object with \"image_id\")")
        annotations.setdefault(ann["image_id"], []).append(ann)
    categories = {c.get("id"): str(c.get("name", c.get("id"))) for c in data.get("categories") or [] if isinstance(c, dict)}
    index = CocoIndex(path, images, annotations, categories, uploaded)
    used = sorted({categories.get(a.get("category_id"), str(a.get("category_id"))) for a in annotations_list})
    log.info("%s: COCO, %d image(s), %d annotation(s) of categories %s, every one filled as cells", path,
             len(images_list), len(annotations_list), ", ".join(used) or "(none)")
    return index


def _coco_mask(index: CocoIndex, image: str, height: int, width: int) -> np.ndarray:
    """The union of the COCO annotations of ``image``: polygons filled by the pixel-centre rule (as
    pycocotools rasterises a polygon), run-length masks (``iscrowd`` ones too) decoded."""
    record = index.entry(image)
    name, path = Path(image).name, index.path
    size = record.get("height"), record.get("width")
    if all(isinstance(v, int) for v in size) and size != (height, width):
        raise DataError(f"{path} gives {name} as {size[1]}×{size[0]}, but the image is {width}×{height}; "
                        "were the annotations made on a resized copy?")
    anns = index.annotations.get(record["id"], [])
    if not anns:
        log.warning("%s holds no annotation of %s: its mask is empty", path, name)
    shapes: list[_Shape] = []
    mask = np.zeros((height, width), np.uint8)
    for ann in anns:
        label = f"annotation {ann.get('id', '?')} of {name}"
        seg = ann.get("segmentation")
        if isinstance(seg, dict):
            mask |= _rle_mask(seg, height, width, path, label)
        elif isinstance(seg, list) and seg:
            for k, poly in enumerate(seg):
                if not isinstance(poly, list) or len(poly) % 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly):
                    raise DataError(f"{path}: {label} has a malformed polygon (expected a flat list [x1, y1, x2, y2, …])")
                if len(poly) < 6:
                    log.info("%s: %s has a polygon of %d point(s), which outlines no area; skipped", path, label, len(poly) // 2)
                    continue
                ring = np.asarray(poly, np.float64).reshape(-1, 2)
                if not np.isfinite(ring).all():
                    raise DataError(f"{path}: {label} has a polygon with a non-finite coordinate")
                shapes.append(_Shape(f"{label}, polygon {k}", [ring]))
        else:
            raise DataError(f"{path}: {label} has no segmentation" + (" (a bounding box only)" if "bbox" in ann else "")
                            + ": fsmeta needs each object's outline or mask, not its box; export instance segmentation")
    for shape in shapes:
        _check_inside(shape, path, name, height, width)
    return mask | fill_shapes(shapes, height, width)


def _rle_counts(counts: object, path: Path, label: str) -> np.ndarray:
    """The run lengths of a COCO RLE: a list of integers, or pycocotools' compressed string (each
    count in 5-bit groups offset by 48, a continuation bit 0x20 and a sign bit 0x10; from the third
    count on, the difference to the count two before)."""
    if isinstance(counts, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
            raise DataError(f"{path}: {label} has RLE counts that are not non-negative integers")
        return np.asarray(counts, np.int64)
    if not isinstance(counts, str):
        raise DataError(f"{path}: {label} has RLE counts that are neither a list nor a string")
    out: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise DataError(f"{path}: {label} has a compressed RLE string that ends in the middle of a count")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise DataError(f"{path}: {label} has a character {counts[p]!r} that a compressed RLE string does not hold")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    if any(v < 0 for v in out):
        raise DataError(f"{path}: {label} has a compressed RLE string that decodes to a negative run")
    return np.asarray(out, np.int64)


def _rle_mask(seg: dict, height: int, width: int, path: Path, label: str) -> np.ndarray:
    """A COCO run-length mask: runs of 0 then 1 alternately, in column-major order, over ``size`` = [h, w]."""
    size = seg.get("size")
    if not (isinstance(size, list) and len(size) == 2):
        raise DataError(f"{path}: {label} is a run-length mask without a \"size\" [height, width]")
    if tuple(size) != (height, width):
        raise DataError(f"{path}: {label} is a run-length mask of {size[1]}×{size[0]}, but the image is {width}×{height}")
    counts = _rle_counts(seg.get("counts"), path, label)
    if int(counts.sum()) != height * width:
        raise DataError(f"{path}: {label}'s run lengths cover {int(counts.sum()):,} pixels, but a {width}×{height} "
                        f"image has {height * width:,}")
    values = np.zeros(len(counts), np.uint8)
    values[1::2] = 1
    return np.ascontiguousarray(np.repeat(values, counts).reshape(width, height).T)


__all__ = ["ANNOTATION_SUFFIXES", "XML_SUFFIXES", "CocoIndex", "coco_index", "IMAGEJ_SUFFIXES", "GEOJSON_SUFFIXES", "is_annotation", "read_annotation", "fill_shapes"]

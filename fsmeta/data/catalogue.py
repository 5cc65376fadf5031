"""Everything fsmeta knows about a data set, in one record per data set (nnU-Net's
``dataset.json`` idea): its kind, the public download's layout, the crop strides,
and the selection defaults. The configuration's per-data-set tables
(:mod:`fsmeta.config`), the CLI's choices and the preparers (:mod:`fsmeta.data.prepare`)
all derive from :data:`CATALOGUE`.

Adding a public data set is one :class:`Dataset` record here and one reader in
``prepare.READERS`` (a test checks that every public record has one). A data set
without a record — a lab's own import, a new synthetic domain — takes the
``default`` entries of the tables.

This module imports nothing of fsmeta, so the configuration can be read and
validated without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PublicSet:
    """What a public data set looks like once unpacked, and where to get it."""

    name: str
    title: str
    pairs: int  # expected image/mask pairs
    shape: tuple[int, int]  # expected (height, width) of every image
    file_dtype: str  # bit depth of the image files
    store_dtype: str  # "uint8", or "float32" for images scaled by their own range
    urls: tuple[str, ...]
    citation: str
    sizes: dict[str, int] = field(default_factory=dict)  # known byte sizes by file name
    sha256: dict[str, str] = field(default_factory=dict)  # known digests by file name
    optional_urls: tuple[str, ...] = ()  # fetched when available, e.g. an official split
    # sha256 of the unpacked files by path below the data set's folder; None: fsmeta.data.checksums' record
    member_sha256: dict[str, str] | None = None


@dataclass(frozen=True)
class Dataset:
    """One data set. ``None`` means "no entry of its own": the table's ``default`` applies.

    Strides are those of the 256×256 training windows (SPEC §3.1); γ is the
    pseudo-label threshold on the histogram-equalised scale [0, 1] and polarity
    says whether objects are dark or bright (SPEC §4.6); ψ is the consistency
    score's brightness/sharpness factor; patches per shot is the 2023 paper's
    patch budget of one shot.
    """

    name: str
    kind: str  # "public" (a preparer reads its download) or "synthetic" (fsmeta.data.synth generates it)
    source_stride: int | None = None
    finetune_stride: int | None = None
    gamma: float | None = None
    polarity: str | None = None
    psi: float | None = None
    patches_per_shot: int | None = None
    layout: PublicSet | None = None  # public data sets: the download and what it unpacks to


# γ: TNBC, EM and ssTEM keep the values of the 2023 paper's public code (20/255, 140/255,
# 140/255); the rest were measured on the synthetic domains (docs/selection.md,
# bench/select_gamma.py). Fluorescent data sets have BRIGHT objects on dark: the image
# is inverted before the inverse threshold, so γ keeps its meaning.
_RECORDS = (
    Dataset("b5", "public", source_stride=140, finetune_stride=30, gamma=0.15, polarity="bright", psi=1.6, patches_per_shot=100,
            layout=PublicSet(
                "b5", "BBBC005 synthetic cells (in-focus F1 images)", 1200, (520, 696), "uint8", "uint8",
                ("https://data.broadinstitute.org/bbbc/BBBC005/BBBC005_v1_images.zip",
                 "https://data.broadinstitute.org/bbbc/BBBC005/BBBC005_v1_ground_truth.zip"),
                "Ljosa et al., Nature Methods 2012 (Broad Bioimage Benchmark Collection, BBBC005v1)")),
    Dataset("b39", "public", source_stride=55, finetune_stride=50, gamma=0.15, polarity="bright", patches_per_shot=100,
            layout=PublicSet(
                "b39", "BBBC039 U2OS nuclei (fluorescence)", 200, (520, 696), "uint16", "float32",
                ("https://data.broadinstitute.org/bbbc/BBBC039/images.zip",
                 "https://data.broadinstitute.org/bbbc/BBBC039/masks.zip"),
                "Ljosa et al., Nature Methods 2012 (Broad Bioimage Benchmark Collection, BBBC039v1)",
                optional_urls=("https://data.broadinstitute.org/bbbc/BBBC039/metadata.zip",))),
    Dataset("sstem", "public", source_stride=32, finetune_stride=30, gamma=0.55, patches_per_shot=500,
            layout=PublicSet(
                "sstem", "ssTEM Drosophila VNC mitochondria (Gerhard et al. 2013)", 20, (1024, 1024), "uint8", "uint8",
                ("https://github.com/unidesigner/groundtruth-drosophila-vnc/archive/master.zip",),
                "Gerhard et al. 2013, figshare 10.6084/m9.figshare.856713 (CC BY-NC-SA 3.0)")),
    Dataset("em", "public", source_stride=85, finetune_stride=30, gamma=0.55, patches_per_shot=400,
            layout=PublicSet(
                "em", "EPFL CA1 hippocampus mitochondria, training volume (Lucchi et al. 2012)", 165, (768, 1024), "uint8", "uint8",
                ("https://documents.epfl.ch/groups/c/cv/cvlab-unit/www/data/%20ElectronMicroscopy_Hippocampus/training.tif",
                 "https://documents.epfl.ch/groups/c/cv/cvlab-unit/www/data/%20ElectronMicroscopy_Hippocampus/training_groundtruth.tif"),
                "Lucchi et al. 2012, EPFL CVLab electron microscopy data set")),
    Dataset("tnbc", "public", source_stride=20, finetune_stride=28, gamma=0.08, patches_per_shot=100,
            layout=PublicSet(
                "tnbc", "TNBC H&E nuclei (Naylor et al. 2019)", 50, (512, 512), "uint8", "uint8",
                ("https://zenodo.org/records/1175282/files/TNBC_NucleiSegmentation.zip",),
                "Naylor et al., IEEE TMI 2019 (Zenodo record 1175282)")),
    Dataset("synth-fluo", "synthetic", gamma=0.15, polarity="bright", psi=1.6),
    Dataset("synth-nuclei", "synthetic", gamma=0.15, polarity="bright"),
    Dataset("synth-em", "synthetic", gamma=0.05),
    Dataset("synth-he", "synthetic", gamma=0.1),
    Dataset("synth-phase", "synthetic", gamma=0.05),
)

CATALOGUE: dict[str, Dataset] = {d.name: d for d in _RECORDS}

# The ``default`` entry of each table: what a data set without a record of its own gets.
# The fine-tuning stride of a data set without a record (a lab's own folders, an imported set) is half fsmeta's
# 128² fine-tuning crop, the grid of every real3 table (docs/results.md, issue 19); the records' strides are the
# paper's, for its 256² windows (configs/paper.yaml names them, and 30 for any other set).
DEFAULTS = Dataset("default", "", source_stride=64, finetune_stride=64, gamma=0.15, polarity="dark", psi=1.3, patches_per_shot=100)

PUBLIC_NAMES: tuple[str, ...] = tuple(d.name for d in _RECORDS if d.kind == "public")
SYNTHETIC_NAMES: tuple[str, ...] = tuple(d.name for d in _RECORDS if d.kind == "synthetic")


def table(attribute: str, *, default: bool = True) -> dict:
    """``{data set: value}`` of one attribute over the records that set it, plus ``default``
    (with ``default=True``): the configuration's per-data-set tables."""
    values = {d.name: getattr(d, attribute) for d in _RECORDS if getattr(d, attribute) is not None}
    if default:
        values["default"] = getattr(DEFAULTS, attribute)
    return values


def public_layouts() -> dict[str, PublicSet]:
    """The layouts of the public data sets, by name."""
    return {d.name: d.layout for d in _RECORDS if d.layout is not None}


__all__ = ["CATALOGUE", "DEFAULTS", "Dataset", "PUBLIC_NAMES", "PublicSet", "SYNTHETIC_NAMES", "public_layouts", "table"]

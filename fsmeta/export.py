"""Weights as other tools run them: ONNX, and BioImage.IO model packages (spec 0.5).

The exported network is :class:`ProbabilityNet`: fsmeta's model without its
stride padding, ending in a sigmoid, so it maps a normalised image (B, 1, H, W),
H and W multiples of the model's stride, to the foreground probability of each
pixel. Normalisation stays outside the network, as the BioImage.IO
preprocessing of an 8-bit image: ``x · 2/255 − 1``, exactly fsmeta's
``(x/255 − 0.5) / 0.5`` (:func:`fsmeta.data.crops.normalise`). fsmeta scales
16-bit and float images by their own min–max range first; a package consumer
should convert such images to 8 bit the same way.

Needs the ``export`` extra (``pip install 'fsmeta[export]'``): onnx, onnxscript
and onnxruntime for ONNX, bioimageio.core (with bioimageio.spec) for packages.
"""

from __future__ import annotations

import contextlib
import getpass
import io
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fsmeta import __version__
from fsmeta.atomic import atomic_write
from fsmeta.errors import FsmetaError
from fsmeta.models import build_model

log = logging.getLogger(__name__)

# ONNX Runtime against PyTorch on the same input, probabilities in [0, 1]: measured
# 6e-8 (float32 rounding of a different convolution order); a package or file that
# differs by more is not written.
ONNX_TOLERANCE = 1e-5
ONNX_OPSET = 18
SAMPLE_SIDE = 256  # the package's test image: at most this many pixels a side

CITATIONS = (
    ("Dawoud, Hornauer, Carneiro and Belagiannis: Few-Shot Microscopy Image Cell Segmentation, ECML-PKDD 2020",
     "https://arxiv.org/abs/2007.01671"),
    ("Dawoud, Bouazizi, Belagiannis and Carneiro: Knowing What to Label for Few Shot Microscopy Image Cell "
     "Segmentation, WACV 2023", "https://arxiv.org/abs/2211.10244"),
)


class ProbabilityNet(nn.Module):
    """σ(logits) of an fsmeta model on input whose sides are multiples of ``stride``.

    Args:
        arch: ``fcrn`` or ``unet``.
        affine: batch norm with scale and shift (fine-tuned weights) or without (pre-trained).
    Shape:
        (B, 1, H, W) normalised to [-1, 1] → (B, 1, H, W) probabilities.
    """

    def __init__(self, arch: str = "fcrn", affine: bool = True) -> None:
        super().__init__()
        self.net = build_model(arch, affine=affine)
        self.stride = int(self.net.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No padding: traced and exported graphs would bake in the pad of the example's shape.
        return torch.sigmoid(self.net._forward(x)[0])


def probability_net(checkpoint: str | Path) -> tuple[ProbabilityNet, dict[str, Any]]:
    """The :class:`ProbabilityNet` of a checkpoint, in eval mode on the CPU, and the checkpoint's metadata."""
    from fsmeta.checkpoint import model_from_checkpoint

    model, meta = model_from_checkpoint(checkpoint)
    net = ProbabilityNet(meta["arch"], affine=bool(meta["bn_affine"]))
    net.net.load_state_dict(model.state_dict())
    return net.eval(), meta


def _require(module: str, what: str) -> None:
    if not _has(module):
        raise FsmetaError(f"{what} needs {module}; install fsmeta's export extra: pip install 'fsmeta[export]'")


def _check_shape(net: ProbabilityNet, x: torch.Tensor, where: str) -> None:
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] % net.stride or x.shape[3] % net.stride:
        raise FsmetaError(f"{where}: the example input must be (B, 1, H, W) with H and W multiples of {net.stride}, "
                          f"got {tuple(x.shape)}")


# ---------------------------------------------------------------- ONNX


@torch.no_grad()
def write_onnx(net: ProbabilityNet, path: str | Path, example: torch.Tensor) -> Path:
    """Export ``net`` to ONNX with a dynamic batch and dynamic sides (multiples of the stride)."""
    _require("onnxscript", "ONNX export")
    from torch.export import Dim

    _check_shape(net, example, str(path))
    s = net.stride
    h, w = Dim("h_over_stride", min=1, max=65536 // s), Dim("w_over_stride", min=1, max=65536 // s)
    # The exporter narrates each pass on stdout and in INFO logs; a person sees fsmeta's progress instead.
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        program = torch.onnx.export(
            net.eval(), (example,), dynamo=True, opset_version=ONNX_OPSET, input_names=["image"], output_names=["probability"],
            dynamic_shapes={"x": {0: Dim("batch", min=1, max=1024), 2: s * h, 3: s * w}}, verbose=False,
        )
    log.debug("torch.onnx.export: %s", chatter.getvalue())
    return atomic_write(path, lambda tmp: program.save(str(tmp)))


@torch.no_grad()
def onnx_difference(path: str | Path, net: ProbabilityNet, x: torch.Tensor) -> float:
    """max |ONNX Runtime − PyTorch| of the probabilities on ``x``."""
    _require("onnxruntime", "checking an ONNX file")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float(np.abs(got - net.eval()(x).numpy()).max())


def export_onnx(checkpoint: str | Path, out: str | Path) -> tuple[Path, float]:
    """Write the checkpoint's network as ONNX and check it against PyTorch with ONNX Runtime.

    Returns the path and the measured max difference (raises if above :data:`ONNX_TOLERANCE`,
    checked on two shapes, so that the dynamic sides are exercised).
    """
    net, _ = probability_net(checkpoint)
    s = net.stride
    rng = np.random.default_rng(0)
    example = torch.from_numpy(rng.uniform(-1, 1, (1, 1, 8 * s, 8 * s)).astype(np.float32))
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="fsmeta-onnx-") as tmp:
        staged = write_onnx(net, Path(tmp) / out.name, example)
        other = torch.from_numpy(rng.uniform(-1, 1, (2, 1, 12 * s, 6 * s)).astype(np.float32))
        diff = max(onnx_difference(staged, net, example), onnx_difference(staged, net, other))
        if diff > ONNX_TOLERANCE:
            raise FsmetaError(f"{out}: ONNX Runtime differs from PyTorch by {diff:.2e} (tolerance {ONNX_TOLERANCE:g}); not written")
        data = staged.read_bytes()
    atomic_write(out, lambda tmp: tmp.write_bytes(data))
    return out, diff


# ---------------------------------------------------------------- BioImage.IO


@dataclass(frozen=True)
class PackageInfo:
    """What a person reads on the package's page; defaults say where the weights came from."""

    name: str = ""  # default: from the checkpoint, e.g. "fsmeta FCRN fine-tuned on synth-he (K=5)"
    authors: tuple[str, ...] = ()  # default: the user exporting
    license: str = "CC-BY-4.0"
    sample: str | Path | None = None  # test image; default: a synthetic image of the checkpoint's kind


def _sample_image(sample: str | Path | None, meta: dict[str, Any], stride: int, side: int = SAMPLE_SIDE) -> np.ndarray:
    """(H, W) uint8 test image, cropped to a centred window whose sides are multiples of ``stride``."""
    if sample is not None:
        from fsmeta.data.io import image_to_unit, read_image

        from fsmeta.data.colour import checkpoint_colour

        image = image_to_unit(read_image(sample), str(sample), checkpoint_colour(meta))
        if image.dtype != np.uint8:
            image = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    else:
        from fsmeta.data.synth import DOMAINS, generate

        domain = meta.get("target") if meta.get("target") in DOMAINS else "synth-nuclei"
        images, _ = generate(domain, 1, size=side, seed=0)  # float32 in [0, 1]
        image = np.clip(np.rint(images[0] * 255), 0, 255).astype(np.uint8)
    h, w = (min(n, side) // stride * stride for n in image.shape)
    if h < 2 * stride or w < 2 * stride:
        raise FsmetaError(f"sample {sample} is {image.shape[1]}×{image.shape[0]}; the package's test image needs at least "
                          f"{2 * stride}×{2 * stride} pixels")
    y0, x0 = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
    return np.ascontiguousarray(image[y0 : y0 + h, x0 : x0 + w])


def _cover(image: np.ndarray, prob: np.ndarray, threshold: float) -> np.ndarray:
    """The test image and its segmentation side by side (2:1, as the model zoo shows covers)."""
    from fsmeta.predict import instance_labels, outline_overlay

    grey = np.repeat(image[..., None], 3, axis=-1)
    return np.concatenate([grey, outline_overlay(image, instance_labels(prob >= threshold))], axis=1)


def _documentation(meta: dict[str, Any], name: str, stride: int) -> str:
    support = meta.get("support") or []
    lines = [
        f"# {name}", "",
        f"Exported by fsmeta {__version__} from a `{meta.get('kind', '?')}` checkpoint "
        f"({meta.get('arch', '?')}, {'affine' if meta.get('bn_affine') else 'running-statistics'} batch norm).", "",
        "## Input and output", "",
        f"- input `raw`: one 8-bit grey image (batch, channel, y, x), sides multiples of {stride} px; "
        "preprocessing scales it to [-1, 1] as x·2/255 − 1 (fsmeta's normalisation). fsmeta scales 16-bit "
        "or float images by their own min–max range to [0, 1] first; do the same before running this model.",
        *([] if meta.get("colour", "grey") == "grey" else [
            "- **colour**: this model was fine-tuned on the *haematoxylin channel* of RGB images, not their "
            "luminance: colour deconvolution (Ruifrok and Johnston 2001, `skimage.color.rgb2hed`), the haematoxylin "
            "stain alone rendered back to RGB (`hed2rgb`), then luminance 0.299 R + 0.587 G + 0.114 B, rounded to "
            "8 bits (`fsmeta.data.colour.haematoxylin_grey`). BioImage.IO preprocessing has no colour "
            "deconvolution, so convert RGB images this way before running the model; the test image is converted so."]),
        f"- output `probability`: foreground probability per pixel; fsmeta thresholds it at "
        f"{float(meta.get('threshold', 0.5)):g} (the threshold this checkpoint records, else 0.5) and labels "
        "8-connected components as cells"
        + (f", dropping those under {int(meta['min_size'])} px (the smallest object this checkpoint records)" if meta.get("min_size") else "")
        + (". fsmeta predicts the mean probability over the 8 flips and 90° turns of the input (test-time "
           "augmentation, and the threshold was chosen on that mean); this package's model is one pass, so its "
           "probabilities differ slightly from fsmeta's" if meta.get("tta") else "")
        + ". Tiles overlapping by 64 px reproduce a whole-image pass.", "",
        "## Training data", "",
    ]
    if meta.get("kind") == "finetuned":
        lines.append(f"Fine-tuned on {meta.get('shots', '?')} annotated image(s) of `{meta.get('target', '?')}` "
                     f"(seed {meta.get('seed', '?')}), starting from `{meta.get('pretraining', '?')}` pre-training.")
        if support:
            lines.append(f"Support images: {', '.join(map(str, support[:20]))}{' …' if len(support) > 20 else ''}.")
    else:
        lines.append(f"Pre-trained (`{meta.get('kind', '?')}`) on the source data sets "
                     f"{', '.join(map(str, (meta.get('config') or {}).get('data', {}).get('sources') or [])) or '(not recorded)'}; "
                     "fine-tune it on a few annotated images of your own with `fsmeta finetune` before use.")
    lines += ["", "## Method", "", *[f"- {text}: {url}" for text, url in CITATIONS], ""]
    return "\n".join(lines)


def _config_subset(meta: dict[str, Any]) -> dict[str, Any]:
    keep = ("arch", "bn_affine", "kind", "pretraining", "target", "shots", "seed", "support", "threshold", "min_size", "tta", "colour",
            "fsmeta_version",
            "mlflow_run_id")
    return json.loads(json.dumps({k: meta[k] for k in keep if k in meta}, default=str))


def build_bioimageio(checkpoint: str | Path, folder: str | Path, info: PackageInfo = PackageInfo(), step=None):
    """Write the package's files into ``folder`` and return its ``bioimageio.spec`` model description.

    ``step(detail)``, when given, is called after each stage (progress for a person waiting).
    """
    step = step or (lambda detail: None)
    _require("bioimageio.spec", "BioImage.IO export")
    from bioimageio.spec.model import v0_5 as bio
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    net, meta = probability_net(checkpoint)
    s = net.stride
    image = _sample_image(info.sample, meta, s)
    test_in = image[None, None]
    x = torch.from_numpy(test_in.astype(np.float32) * np.float32(2 / 255) - np.float32(1))
    with torch.no_grad():
        test_out = net(x).numpy()
    np.save(folder / "test_input.npy", test_in)
    np.save(folder / "test_output.npy", test_out)
    Image.fromarray(_cover(image, test_out[0, 0], float(meta.get("threshold", 0.5)))).save(folder / "cover.png")
    step(f"test image {image.shape[1]}×{image.shape[0]} and cover")

    torch.save(net.state_dict(), folder / "weights.pt")
    with torch.no_grad():
        traced = torch.jit.trace(net, x, check_trace=False)
    traced.save(str(folder / "weights.torchscript.pt"))
    step("state dict and TorchScript weights")
    has_onnx = _has("onnxscript") and _has("onnx")  # without them the package has TorchScript and the state dict
    if has_onnx:
        write_onnx(net, folder / "weights.onnx", x)
        step("ONNX weights")
    name = _spec_name(info.name) if info.name else _default_name(meta)
    (folder / "README.md").write_text(_documentation(meta, name, s), encoding="utf-8")

    torch_version = bio.Version(torch.__version__.split("+")[0])
    state_dict = bio.PytorchStateDictWeightsDescr(
        source=folder / "weights.pt", pytorch_version=torch_version,
        architecture=bio.ArchitectureFromLibraryDescr(
            callable=bio.Identifier("ProbabilityNet"), import_from="fsmeta.export",
            kwargs={"arch": meta["arch"], "affine": bool(meta["bn_affine"])}),
    )
    weights = bio.WeightsDescr(
        pytorch_state_dict=state_dict,
        torchscript=bio.TorchscriptWeightsDescr(source=folder / "weights.torchscript.pt", pytorch_version=torch_version,
                                                parent="pytorch_state_dict"),
        onnx=bio.OnnxWeightsDescr(source=folder / "weights.onnx", opset_version=ONNX_OPSET, parent="pytorch_state_dict")
        if has_onnx else None,
    )
    size = bio.ParameterizedSize(min=2 * s, step=s)
    inputs = [bio.InputTensorDescr(
        id=bio.TensorId("raw"),
        description="8-bit grey image" if meta.get("colour", "grey") == "grey" else
        "8-bit haematoxylin channel of an RGB image (see the documentation: colour deconvolution first)",
        axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier("grey")]),
              bio.SpaceInputAxis(id=bio.AxisId("y"), size=size), bio.SpaceInputAxis(id=bio.AxisId("x"), size=size)],
        test_tensor=bio.FileDescr(source=folder / "test_input.npy"),
        data=bio.IntervalOrRatioDataDescr(type="uint8", range=(0, 255)),
        # The closing ensure_dtype matters: without it the spec casts the result back to the input's uint8.
        preprocessing=[
            bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32")),
            bio.ScaleLinearDescr(kwargs=bio.ScaleLinearKwargs(gain=2 / 255, offset=-1.0)),
            bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32")),
        ],
    )]

    def same(axis: str):
        return bio.SizeReference(tensor_id=bio.TensorId("raw"), axis_id=bio.AxisId(axis))

    outputs = [bio.OutputTensorDescr(
        id=bio.TensorId("probability"),
        description="foreground probability per pixel",
        axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier("foreground")]),
              bio.SpaceOutputAxis(id=bio.AxisId("y"), size=same("y")), bio.SpaceOutputAxis(id=bio.AxisId("x"), size=same("x"))],
        test_tensor=bio.FileDescr(source=folder / "test_output.npy"),
        data=bio.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
    )]
    authors = info.authors or (_user(),)
    return bio.ModelDescr(
        name=name,
        description=f"Foreground segmentation of cells in microscopy images: {meta.get('arch', '').upper()} trained by "
                    "fsmeta (few-shot meta-learning, Dawoud et al. 2020/2023).",
        authors=[bio.Author(name=a) for a in authors],
        cite=[bio.CiteEntry(text=text, url=bio.HttpUrl(url)) for text, url in CITATIONS],
        license=bio.LicenseId(info.license),
        documentation=bio.FileDescr(source=folder / "README.md"),
        covers=[bio.FileDescr(source=folder / "cover.png")],
        tags=["cell-segmentation", "semantic-segmentation", "2d", "pytorch",
              "few-shot", meta.get("arch", "fcrn")],
        inputs=inputs,
        outputs=outputs,
        weights=weights,
        config={"fsmeta": _config_subset(meta)},
    )


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # "bioimageio.spec" when there is no "bioimageio" at all
        return False


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (a container): still an author the spec accepts
        return "fsmeta user"


def _default_name(meta: dict[str, Any]) -> str:
    arch = str(meta.get("arch", "model")).upper()
    if meta.get("kind") == "finetuned":
        name = f"fsmeta {arch} fine-tuned on {meta.get('target', 'images')} (K {meta.get('shots', '?')})"
    else:
        name = f"fsmeta {arch} pre-trained ({meta.get('kind', 'checkpoint')})"
    return _spec_name(name)


def _spec_name(name: str) -> str:
    """A name the spec accepts: letters, digits, ``_+- ()``, at most 128 characters."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+- ()")
    return "".join(c if c in allowed else "-" for c in name)[:128].strip() or "fsmeta model"


def test_package(source, weight_format: str | None = None):
    """Run bioimageio.core's own model test; returns its ValidationSummary (status "passed" or "failed")."""
    _require("bioimageio.core", "testing a BioImage.IO package")
    from bioimageio.core import test_model

    return test_model(source, weight_format=weight_format)


test_package.__test__ = False  # not a pytest test, despite its name


def export_bioimageio(checkpoint: str | Path, out: str | Path, info: PackageInfo = PackageInfo(), check: bool = True,
                      progress: bool = False) -> Path:
    """Write a BioImage.IO model package (zip) of a checkpoint; with ``check``, bioimageio.core's model test
    must pass on every weight format first, or nothing is written."""
    _require("bioimageio.spec", "BioImage.IO export")
    from bioimageio.spec import save_bioimageio_package

    from fsmeta.progress import Progress

    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise FsmetaError(f"--out {out}: a BioImage.IO package is a .zip file")
    formats = 3 if _has("onnxscript") and _has("onnx") else 2
    bar = Progress(formats + (formats if check else 0) + 1, "export", every=0.0, enabled=progress)
    with tempfile.TemporaryDirectory(prefix="fsmeta-bioimageio-") as tmp:
        descr = build_bioimageio(checkpoint, tmp, info, step=lambda detail: bar.update(detail=detail))
        if check:
            for fmt in _weight_formats(descr):
                summary = test_package(descr, weight_format=fmt)
                if summary.status != "passed":
                    raise FsmetaError(f"{out}: bioimageio.core's model test failed for the {fmt} weights; nothing written:\n"
                                      f"{summary.format()}")
                bar.update(detail=f"bioimageio.core model test passed ({fmt})")
        atomic_write(out, lambda t: save_bioimageio_package(descr, output_path=t))
        bar.update(detail=f"package {out}")
    return out


def _weight_formats(descr) -> list[str]:
    return [f for f in ("pytorch_state_dict", "torchscript", "onnx") if getattr(descr.weights, f, None) is not None]


__all__ = ["ProbabilityNet", "probability_net", "write_onnx", "onnx_difference", "export_onnx", "PackageInfo",
           "build_bioimageio", "export_bioimageio", "test_package", "ONNX_TOLERANCE", "CITATIONS"]

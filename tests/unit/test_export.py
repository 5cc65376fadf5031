"""`fsmeta export`: ONNX checked against PyTorch by ONNX Runtime, and a BioImage.IO package that
passes bioimageio.core's own model test (offline) for each of its weight formats."""

import zipfile

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from PIL import Image

from fsmeta.checkpoint import save_checkpoint
from fsmeta.cli import main
from fsmeta.export import ONNX_TOLERANCE, ProbabilityNet, probability_net, test_package
from fsmeta.models import build_model


def _checkpoint(path, arch, affine, **meta):
    torch.manual_seed(0)
    model = build_model(arch, affine=affine).eval()
    for m in model.modules():  # running statistics away from (0, 1), as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return save_checkpoint(path, model.state_dict(), {"arch": arch, "bn_affine": affine, **meta})


def test_probability_net_is_the_models_sigmoid(tmp_path):
    ckpt = _checkpoint(tmp_path / "w.safetensors", "fcrn", False, kind="meta")
    net, _ = probability_net(ckpt)
    from fsmeta.checkpoint import model_from_checkpoint

    model, _ = model_from_checkpoint(ckpt)
    x = torch.rand(2, 1, 64, 48) * 2 - 1
    with torch.no_grad():
        assert torch.equal(net(x), torch.sigmoid(model.eval()(x)))


def test_onnx_export_agrees_with_pytorch(tmp_path, capsys):
    """ONNX Runtime vs PyTorch on probabilities: measured 6e-8; asserted below ONNX_TOLERANCE (1e-5)."""
    ckpt = _checkpoint(tmp_path / "w.safetensors", "fcrn", True, kind="finetuned", target="synth-he", shots=2)
    out = tmp_path / "model.onnx"
    assert main(["export", "--weights", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    assert "tolerance" in capsys.readouterr().out
    net, _ = probability_net(ckpt)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for shape in [(1, 1, 64, 64), (3, 1, 40, 72)]:  # dynamic batch and sides (multiples of the stride, 8)
        x = torch.rand(*shape) * 2 - 1
        got = session.run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            want = net(x).numpy()
        assert got.shape == shape and np.abs(got - want).max() < ONNX_TOLERANCE


def test_bioimageio_package_passes_the_core_model_test(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "w.safetensors", "unet", False, kind="meta",
                       config={"data": {"sources": ["synth-fluo", "synth-nuclei"]}})
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((70, 66)) * 255).astype(np.uint8)).save(tmp_path / "sample.png")
    out = tmp_path / "model.zip"
    argv = ["export", "--weights", str(ckpt), "--format", "bioimageio", "--out", str(out), "--sample", str(tmp_path / "sample.png"),
            "--author", "A. Tester", "--no-check"]  # the test below runs the check on the written zip
    assert main(argv) == 0
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        rdf = yaml.safe_load(z.read("rdf.yaml"))
    assert {"rdf.yaml", "weights.pt", "weights.torchscript.pt", "weights.onnx", "test_input.npy", "test_output.npy",
            "cover.png", "README.md"} <= names
    assert rdf["format_version"].startswith("0.5") and rdf["authors"] == [{"name": "A. Tester"}]
    assert [c["url"] for c in rdf["cite"]] == ["https://arxiv.org/abs/2007.01671", "https://arxiv.org/abs/2211.10244"]
    pre = rdf["inputs"][0]["preprocessing"]
    assert pre[1] == {"id": "scale_linear", "kwargs": {"gain": 2 / 255, "offset": -1.0}}  # fsmeta's (x/255 − 0.5)/0.5
    assert rdf["weights"]["pytorch_state_dict"]["architecture"]["kwargs"] == {"arch": "unet", "affine": False}
    with zipfile.ZipFile(out) as z:
        z.extract("test_input.npy", tmp_path)
    assert np.load(tmp_path / "test_input.npy").shape == (1, 1, 68, 64)  # centre crop to multiples of the stride (4)
    for fmt in ("pytorch_state_dict", "torchscript", "onnx"):
        summary = test_package(out, weight_format=fmt)
        assert summary.status == "passed", summary.format()


def test_export_errors_name_the_file(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "w.safetensors", "unet", True, kind="finetuned")
    assert main(["export", "--weights", str(ckpt), "--format", "bioimageio", "--out", str(tmp_path / "model.yaml")]) == 2
    assert "model.yaml" in capsys.readouterr().err
    assert main(["export", "--weights", str(tmp_path / "none.safetensors"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "none.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "model.yaml").exists()


@pytest.mark.parametrize("arch", ["fcrn", "unet"])
def test_probability_net_state_dict_loads_into_the_declared_architecture(arch):
    net = ProbabilityNet(arch, affine=True)
    again = ProbabilityNet(arch, affine=True)
    again.load_state_dict(net.state_dict())  # what bioimageio.core does with weights.pt


def test_without_the_export_extra_the_error_says_what_to_install(tmp_path, monkeypatch, capsys):
    import fsmeta.export as export

    monkeypatch.setattr(export, "_has", lambda module: False)
    ckpt = _checkpoint(tmp_path / "w.safetensors", "unet", True, kind="finetuned")
    for fmt, out in (("onnx", "m.onnx"), ("bioimageio", "m.zip")):
        assert main(["export", "--weights", str(ckpt), "--format", fmt, "--out", str(tmp_path / out)]) == 2
        assert "pip install 'fsmeta[export]'" in capsys.readouterr().err

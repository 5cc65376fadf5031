"""The device-aware training step (fsmeta/compute.py): the CPU path is the fp32 path it replaced,
bf16 autocast stays within a stated tolerance of fp32, the compute section round-trips, and
source actors share GPUs by the packing rule."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import fsmeta.compute as compute_module
from fsmeta.compute import autocast, autocast_dtype, channels_last, host_buffer, host_values, prepare_model, to_device
from fsmeta.config import ComputeConfig, FinetuneConfig, config_from_dict, dump_config, load_config
from fsmeta.errors import ConfigError, NonFiniteLossError
from fsmeta.finetune import finetune
from fsmeta.losses import weighted_bce
from fsmeta.meta.reptile import InnerSettings, TaskBatch, adapt
from fsmeta.models import build_model, clone_state, make_bn_affine

CPU = torch.device("cpu")
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# bf16 autocast vs fp32, a few epochs of fine-tuning at 64×64: the per-epoch mean loss may
# differ by this relative amount, the weights by this relative (L2) distance. Measured on CPU:
# ≤ 0.09 % and ≤ 0.26 % (FCRN and U-Net, 2–5 epochs); docs/benchmarks.md states the same bound.
BF16_LOSS_RTOL = 1e-2
BF16_WEIGHT_RTOL = 1e-2


def _support(seed: int = 0, n: int = 8, s: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Discs on noise: crops a model can learn a little from in a few epochs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:s, :s]
    x = np.empty((n, 1, s, s), np.float32)
    y = np.empty_like(x)
    for k in range(n):
        cy, cx = rng.uniform(16, 48, 2)
        r = rng.uniform(6, 14)
        m = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float32)
        y[k, 0] = m
        x[k, 0] = 0.6 * m - 0.3 + 0.2 * rng.standard_normal((s, s)).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


def _plain_fp32_finetune(model, x, y, cfg: FinetuneConfig, seed: int) -> tuple[torch.nn.Module, list[float]]:
    """fsmeta's fine-tuning loop as it was before fsmeta.compute: fp32, one loss read per step."""
    make_bn_affine(model)
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []
    for epoch in range(cfg.epochs):
        order = torch.from_numpy(np.random.default_rng([seed, 31337, epoch]).permutation(len(x)))
        total, batches = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss = weighted_bce(model(x[rows]), y[rows])
            value = float(loss.detach())
            loss.backward()
            optimiser.step()
            total += value
            batches += 1
        history.append(total / batches)
    return model, history


def _assert_states_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------- the fp32 path is exact


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    """A processor without native bf16 that is not x86-64 (e.g. aarch64): ``auto`` is the exact fp32 path there."""
    monkeypatch.setattr(compute_module, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(compute_module, "_x86_64", lambda: False)


@pytest.fixture
def x86_without_bf16(monkeypatch):
    """An x86-64 processor without native bf16 (AVX2, the 2-core EPYC of docs/benchmarks.md)."""
    monkeypatch.setattr(compute_module, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(compute_module, "_x86_64", lambda: True)


@pytest.fixture
def cpu_with_bf16(monkeypatch):
    monkeypatch.setattr(compute_module, "cpu_has_native_bf16", lambda: True)


@pytest.mark.parametrize("native,x86", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("arch", ["fcrn", "unet"])
def test_cpu_finetune_equals_the_plain_fp32_loop_bit_for_bit(arch, native, x86, monkeypatch):
    """``amp=off, channels_last=off`` is the plain fp32 loop on any CPU; so is ``auto`` (the default)
    on one that neither computes bf16 natively nor is x86-64 (where channels_last is on)."""
    monkeypatch.setattr(compute_module, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(compute_module, "_x86_64", lambda: x86)
    x, y = _support()
    cfg = FinetuneConfig(epochs=2, steps=0, batch_size=3)  # 8 crops: batches of 3, 3, 2
    torch.manual_seed(0)
    base = build_model(arch)
    reference, ref_history = _plain_fp32_finetune(copy.deepcopy(base), x, y, cfg, seed=4)
    for compute in [ComputeConfig(amp="off", channels_last="off")] + ([] if native or x86 else [None, ComputeConfig()]):
        model, history = finetune(copy.deepcopy(base), x, y, cfg, seed=4, compute=compute)
        assert history == ref_history
        _assert_states_equal(model, reference)


def test_native_bf16_is_detected_from_the_processor():
    flags_path = Path("/proc/cpuinfo")
    if not flags_path.is_file():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = next((ln.split(":", 1)[1].split() for ln in flags_path.read_text().splitlines() if ln.startswith("flags")), [])
    assert compute_module.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_auto_is_bf16_and_channels_last_on_a_cpu_with_native_bf16(cpu_with_bf16):
    compute = ComputeConfig()
    assert autocast_dtype(CPU, compute) == torch.bfloat16 and channels_last(CPU, compute)
    assert autocast_dtype(CPU, ComputeConfig(amp="off")) is None and not channels_last(CPU, ComputeConfig(channels_last="off"))
    with autocast(CPU, compute):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    model = prepare_model(build_model("fcrn"), CPU, compute)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, never a bf16 model
    x, y = _support(n=4)
    trained, history = finetune(model, x, y, FinetuneConfig(epochs=1, steps=0, batch_size=4), seed=0)
    assert all(p.dtype == torch.float32 for p in trained.parameters()) and math.isfinite(history[0])


def test_cpu_defaults_do_nothing_to_model_or_batches(cpu_without_bf16):
    compute = ComputeConfig()
    assert autocast_dtype(CPU, compute) is None and not channels_last(CPU, compute)
    assert autocast_dtype(torch.device("cuda"), compute) == torch.bfloat16 and channels_last(torch.device("cuda"), compute)
    assert autocast_dtype(torch.device("cuda"), ComputeConfig(amp="off")) is None
    with autocast(CPU, compute):
        assert not torch.is_autocast_enabled("cpu")
    model = build_model("fcrn")
    before = {k: (v.data_ptr(), v.stride()) for k, v in model.state_dict().items()}
    assert prepare_model(model, CPU, compute) is model
    assert {k: (v.data_ptr(), v.stride()) for k, v in model.state_dict().items()} == before
    t = torch.zeros(2, 1, 8, 8)
    assert to_device(t, CPU) is t
    assert not host_buffer((2, 1, 8, 8), CPU).is_pinned()


def test_auto_is_fp32_with_channels_last_on_an_x86_cpu_without_native_bf16(x86_without_bf16):
    """fp32 (no autocast) in oneDNN's faster channels_last layout; the fine-tune stays within fp32
    rounding of the exact path (the same function, summed in another order)."""
    compute = ComputeConfig()
    assert autocast_dtype(CPU, compute) is None and channels_last(CPU, compute)
    assert not channels_last(CPU, ComputeConfig(channels_last="off"))
    with autocast(CPU, compute):
        assert not torch.is_autocast_enabled("cpu")
    model = prepare_model(build_model("fcrn"), CPU, compute)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    x, y = _support()
    cfg = FinetuneConfig(epochs=2, steps=0, batch_size=3)
    torch.manual_seed(0)
    base = build_model("fcrn")
    exact, h_exact = finetune(copy.deepcopy(base), x, y, cfg, seed=4, compute=ComputeConfig(amp="off", channels_last="off"))
    fast, h_fast = finetune(copy.deepcopy(base), x, y, cfg, seed=4)
    for a, b in zip(h_exact, h_fast):
        assert abs(b - a) <= 1e-4 * abs(a)
    w0 = torch.cat([p.detach().flatten() for p in exact.parameters()])
    w1 = torch.cat([p.detach().flatten() for p in fast.parameters()])
    # Adam's normalised steps carry the rounding of near-zero gradients into the weights: 1.1e-4
    # after 6 steps here, against bf16's 2.6e-3 (BF16_WEIGHT_RTOL allows 1e-2)
    assert float((w1 - w0).norm() / w0.norm()) <= 1e-3


def test_channels_last_on_cpu_is_close_to_the_default_layout():
    model = prepare_model(build_model("unet"), CPU, ComputeConfig(channels_last="on"))
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        reference = build_model("unet")
        reference.load_state_dict(model.state_dict())
        reference.eval()
        model.eval()
        torch.testing.assert_close(model(to_device(x, CPU, True)), reference(x), rtol=1e-4, atol=1e-5)


def test_host_values_are_the_floats_read_one_by_one():
    values = [torch.tensor(1.0) / 3, torch.tensor(float("nan")), torch.tensor(2.5e-8)]
    out = host_values(values)
    assert out[0] == float(values[0]) and math.isnan(out[1]) and out[2] == float(values[2])
    assert host_values([]) == []


def test_adapt_with_autocast_off_equals_the_default_on_cpu(cpu_without_bf16):
    rng = np.random.default_rng(0)
    arrays = [rng.uniform(-1, 1, (2, 1, 32, 32)).astype(np.float32) for _ in range(3)]
    batch = TaskBatch.from_numpy(arrays[0], (arrays[1] > 0.6).astype(np.float32), arrays[1], arrays[2])
    settings = InnerSettings(steps=2, lr=1e-3, weight_decay=5e-4, alpha=0.01, beta=0.01)
    torch.manual_seed(0)
    model = build_model("fcrn")
    theta = clone_state(model)
    a = adapt(model, theta, batch, settings)
    b = adapt(model, theta, batch, settings, compute=ComputeConfig(amp="off"))
    assert a.losses == b.losses
    assert all(torch.equal(a.theta[k], b.theta[k]) for k in theta)


def test_finetune_non_finite_loss_names_the_epoch():
    x, y = _support(n=4)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="cell A: loss is nan in epoch 0; lower finetune.lr"):
        finetune(build_model("fcrn"), x, y, FinetuneConfig(epochs=2, steps=0, batch_size=4), seed=0, where="cell A")
    # the default, a step budget: the first non-finite step is named
    with pytest.raises(NonFiniteLossError, match="cell A: loss is nan at step 0; lower finetune.lr"):
        finetune(build_model("fcrn"), x, y, FinetuneConfig(steps=3, batch_size=4), seed=0, where="cell A")


# ---------------------------------------------------------------- bf16 within tolerance


@pytest.mark.parametrize("arch", ["fcrn", "unet"])
def test_bf16_autocast_finetune_stays_within_tolerance_of_fp32(arch):
    x, y = _support()
    cfg = FinetuneConfig(epochs=3, steps=0, batch_size=4)
    torch.manual_seed(0)
    base = build_model(arch)
    fp32, h32 = finetune(copy.deepcopy(base), x, y, cfg, seed=0, compute=ComputeConfig(amp="off"))
    bf16, h16 = finetune(copy.deepcopy(base), x, y, cfg, seed=0, compute=ComputeConfig(amp="bf16"))
    assert h16 != h32  # autocast really ran in bf16
    for a, b in zip(h32, h16):
        assert abs(b - a) <= BF16_LOSS_RTOL * abs(a)
    w32 = torch.cat([p.detach().flatten() for p in fp32.parameters()])
    w16 = torch.cat([p.detach().flatten() for p in bf16.parameters()])
    assert all(p.dtype == torch.float32 for p in bf16.parameters())  # autocast never changes the weights' dtype
    assert float((w16 - w32).norm() / w32.norm()) <= BF16_WEIGHT_RTOL


# ---------------------------------------------------------------- configuration


def test_compute_section_round_trips_and_validates(tmp_path):
    cfg = load_config(None, ["compute.amp=bf16", "compute.channels_last=off", "compute.compile=true",
                             "compute.cudnn_benchmark=false"])
    assert cfg.compute == ComputeConfig(amp="bf16", channels_last="off", cudnn_benchmark=False, compile=True)
    assert config_from_dict(cfg.to_dict()).compute == cfg.compute
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path).compute == cfg.compute
    assert yaml.safe_load(dump_config(load_config(None)))["compute"] == {
        "amp": "auto", "channels_last": "auto", "cudnn_benchmark": True, "compile": False}
    assert cfg.flat()["compute.amp"] == "bf16"
    # A bare YAML off/on is a boolean to the parser; it still means the switch.
    assert load_config(None, ["compute.amp=off", "compute.channels_last=on"]).compute == ComputeConfig(amp="off", channels_last="on")
    path.write_text("compute:\n  amp: off\n  channels_last: false\n")
    assert load_config(path).compute == ComputeConfig(amp="off", channels_last="off")
    assert "'off'" in dump_config(load_config(path))  # written back quoted, so it reads back as the string
    with pytest.raises(ConfigError, match="compute.amp='fp16' is not 'auto', 'bf16' or 'off'"):
        load_config(None, ["compute.amp=fp16"])
    with pytest.raises(ConfigError, match="compute.amp='on' is not"):
        load_config(None, ["compute.amp=on"])
    with pytest.raises(ConfigError, match="compute.channels_last='sometimes'"):
        load_config(None, ["compute.channels_last=sometimes"])
    with pytest.raises(ConfigError, match="unknown configuration key compute.amps"):
        load_config(None, ["compute.amps=off"])


# ---------------------------------------------------------------- GPU packing of source actors


@pytest.mark.parametrize("configured, gpus, sources, share", [
    (-1, 0, 4, 0.0),        # no GPU: CPU actors
    (-1, 8, 4, 1.0),        # more GPUs than sources: one each
    (-1, 4, 4, 1.0),
    (-1, 1, 4, 0.25),       # one GPU: four actors share it
    (-1, 2, 4, 0.5),
    (-1, 1, 3, 0.3333),     # rounded down: three shares fit on one GPU
    (-1, 3, 4, 0.5),        # not 0.75: a fourth 0.75 would find no GPU with 0.75 free
    (-1, 2, 5, 0.3333),
    (-1, 0.5, 4, 0.0),      # less than one whole GPU in the cluster
    (0.5, 8, 4, 0.5),       # an explicit share is taken as it is
    (0, 8, 4, 0.0),
])
def test_worker_gpu_share(configured, gpus, sources, share):
    pytest.importorskip("ray")
    from fsmeta.meta.resources import worker_gpus

    got = worker_gpus(configured, gpus, sources)
    assert got == pytest.approx(share, abs=1e-12)
    if configured < 0 and got > 0:
        per_gpu = math.floor(1 / got + 1e-9)
        assert per_gpu * got <= 1.0 and per_gpu * math.floor(gpus) >= sources  # every actor fits on a GPU


# ---------------------------------------------------------------- CUDA (run where a GPU is lent)


@CUDA_ONLY
def test_cuda_path_pins_and_trains_in_bf16_close_to_fp32():
    cuda = torch.device("cuda")
    pinned = host_buffer((2, 1, 8, 8), cuda)
    assert pinned.is_pinned() and to_device(pinned, cuda).device.type == "cuda"
    x, y = _support()
    cfg = FinetuneConfig(epochs=3, steps=0, batch_size=4)
    torch.manual_seed(0)
    base = build_model("fcrn")
    fp32, h32 = finetune(copy.deepcopy(base).to(cuda), x, y, cfg, seed=0, compute=ComputeConfig(amp="off", channels_last="off"))
    fast, h16 = finetune(copy.deepcopy(base).to(cuda), x, y, cfg, seed=0)  # defaults: bf16 + channels_last
    for a, b in zip(h32, h16):
        assert abs(b - a) <= BF16_LOSS_RTOL * abs(a)
    w32 = torch.cat([p.detach().flatten() for p in fp32.parameters()])
    w16 = torch.cat([p.detach().flatten() for p in fast.parameters()])
    assert float((w16 - w32).norm() / w32.norm()) <= BF16_WEIGHT_RTOL


# ------------------------------------------------------------------ what a result records


def test_describe_names_the_path_auto_resolves_to_on_each_kind_of_processor(monkeypatch):
    """``auto`` is bf16 + channels_last where bf16 is native, fp32 + channels_last on another x86-64
    CPU, the exact path elsewhere; a forced setting wins. The record says which, and on what."""
    cases = [  # (native bf16, x86-64, amp, channels_last) → (precision, channels_last, native_bf16)
        (True, True, "auto", "auto", "bf16", "on", "yes"),
        (False, True, "auto", "auto", "fp32", "on", "no"),
        (False, False, "auto", "auto", "fp32", "off", "no"),
        (False, True, "bf16", "off", "bf16", "off", "no"),
        (True, True, "off", "off", "fp32", "off", "yes"),
    ]
    for native, x86, amp, cl, precision, memory, bf16 in cases:
        monkeypatch.setattr(compute_module, "cpu_has_native_bf16", lambda native=native: native)
        monkeypatch.setattr(compute_module, "_x86_64", lambda x86=x86: x86)
        record = compute_module.describe(CPU, ComputeConfig(amp=amp, channels_last=cl))
        assert record == {"precision": precision, "channels_last": memory, "device": "cpu",
                          "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": bf16,
                          "torch": torch.__version__}, (native, x86, amp, cl)
    label = compute_module.describe_label({"precision": "bf16", "channels_last": "on", "device": "cpu", "cpu_capability": "AVX512"})
    assert label == "bf16 + channels_last on cpu (AVX512)"
    assert compute_module.describe_label({"precision": "fp32", "channels_last": "off", "device": "NVIDIA H100",
                                          "cpu_capability": "AVX2"}) == "fp32 on NVIDIA H100 (AVX2)"
    assert compute_module.describe_label({}) == "unrecorded"
    assert compute_module.compute_tags({"precision": "fp32", "device": "cpu"}) == {
        "fsmeta.compute.precision": "fp32", "fsmeta.compute.device": "cpu"}


def test_a_checkpoint_records_the_machine_that_wrote_it(tmp_path, x86_without_bf16):
    from fsmeta.checkpoint import read_checkpoint_meta, save_checkpoint

    path = save_checkpoint(tmp_path / "m.safetensors", clone_state(build_model("fcrn")), {"arch": "fcrn", "bn_affine": False})
    expected = {"device": "cpu", "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": "no",
                "torch": torch.__version__}
    assert read_checkpoint_meta(path)["machine"] == expected
    assert json.loads(path.with_suffix(".json").read_text())["machine"] == expected

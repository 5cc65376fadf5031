"""The command line as a user meets it: clear errors (exit 2, no traceback) and the main round trip."""

import json


from fsmeta.cli import main
from tests.conftest import TINY


def _tiny_args(tmp_path):
    args = []
    for item in TINY:
        args += ["--set", item]
    return args + ["--data-root", str(tmp_path / "data")]


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_unknown_target_is_named(tmp_path, capsys):
    code, _, err = _run(capsys, "meta-train", *_tiny_args(tmp_path), "--target", "synth-xyz", "--sources", "synth-em", "--out", str(tmp_path / "o"))
    assert code == 2
    assert "unknown target 'synth-xyz'" in err and "synth-he" in err and "Traceback" not in err


def test_target_also_a_source_is_rejected(tmp_path, capsys):
    code, _, err = _run(capsys, "meta-train", *_tiny_args(tmp_path), "--sources", "synth-em,synth-he", "--out", str(tmp_path / "o"))
    assert code == 2 and "target 'synth-he' is also listed as a source" in err


def test_k_larger_than_the_pool(tmp_path, capsys):
    code, _, err = _run(capsys, "demo", *_tiny_args(tmp_path), "--set", "eval.shots=[1, 9]", "--no-tracking", "--out", str(tmp_path / "o"))
    assert code == 2 and "K=9 is larger than the pool of 8 image(s) of target synth-he" in err


def test_unknown_config_key_and_missing_weights(tmp_path, capsys):
    code, _, err = _run(capsys, "meta-train", "--set", "meta.alhpa=1")
    assert code == 2 and "unknown configuration key meta.alhpa" in err
    code, _, err = _run(capsys, "finetune", *_tiny_args(tmp_path), "--weights", str(tmp_path / "none.safetensors"))
    assert code == 2 and "none.safetensors does not exist" in err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    code, _, err = _run(capsys, "evaluate", *_tiny_args(tmp_path), "--weights", str(bad))
    assert code == 2 and "bad.safetensors is not a readable safetensors checkpoint" in err


def test_meta_train_finetune_evaluate_round_trip(tmp_path, capsys):
    args = _tiny_args(tmp_path)
    assert _run(capsys, "meta-train", *args, "--out", str(tmp_path / "meta"))[0] == 0
    ckpt = tmp_path / "meta" / "meta.safetensors"
    code, out, _ = _run(capsys, "finetune", *args, "--weights", str(ckpt), "--shots", "2", "--seed", "1", "--out", str(tmp_path / "ft.safetensors"))
    assert code == 0 and "fine-tuned on 2 image(s) of synth-he" in out
    sidecar = json.loads((tmp_path / "ft.json").read_text())
    assert sidecar["bn_affine"] is True and sidecar["shots"] == 2 and len(sidecar["support"]) == 2
    code, out, _ = _run(capsys, "evaluate", *args, "--weights", str(tmp_path / "ft.safetensors"), "--out", str(tmp_path / "ev.json"))
    assert code == 0 and "6 test image(s)" in out
    report = json.loads((tmp_path / "ev.json").read_text())
    assert report["n_images"] == 6 and not {r["image"] for r in report["images"]} & set(sidecar["support"])
    code, _, err = _run(capsys, "finetune", *args, "--weights", str(tmp_path / "ft.safetensors"), "--out", str(tmp_path / "ft2.safetensors"))
    assert code == 2 and "already fine-tuned" in err


def test_data_synth_and_list(tmp_path, capsys):
    root = tmp_path / "data"
    code, out, _ = _run(capsys, "data", "synth", "--data-root", str(root), "--domains", "synth-em", "synth-fluo", "--images", "3", "--size", "64")
    assert code == 0 and out.count("3 images 64×64") == 2
    code, out, _ = _run(capsys, "data", "list", "--data-root", str(root))
    assert code == 0
    line = next(l for l in out.splitlines() if l.startswith("synth-em"))
    assert "synthetic" in line and " 3 " in line and "64×64" in line
    assert "generated on first use: synth-nuclei, synth-he, synth-phase" in out
    code, _, err = _run(capsys, "data", "synth", "--data-root", str(root), "--domains", "synth-zz")
    assert code == 2 and "unknown synthetic domain 'synth-zz'" in err

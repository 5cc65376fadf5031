"""Progress for the steps a person waits on: evaluation and selection print progress lines when
asked and stay silent inside studies (the default). Fine-tuning's progress is the training
step's own (finetune(progress=True))."""

import numpy as np

from fsmeta.config import load_config
from fsmeta.data.store import ImageSet
from fsmeta.evaluate import evaluate
from fsmeta.models import build_model
from fsmeta.select.selection import select_support


def _images(n=3, size=64):
    rng = np.random.default_rng(0)
    images = [(rng.random((size, size)) * 255).astype(np.uint8) for _ in range(n)]
    masks = [(img > 128).astype(np.uint8) for img in images]
    return ImageSet("toy", [f"i{k}" for k in range(n)], images, masks, ["train"] * n, [""] * n)


def test_evaluate_prints_progress_only_when_asked(capsys):
    model, images = build_model("unet"), _images()
    evaluate(model, images, range(3))
    assert capsys.readouterr().err == ""
    summary, rows = evaluate(model, images, range(3), progress=True)
    assert "[evaluate toy] 3/3" in capsys.readouterr().err and len(rows) == 3


def test_selection_prints_progress_only_when_asked(capsys):
    cfg = load_config(None, ["select.patch_size=32", "select.candidate_min_foreground=0"])
    model, images = build_model("unet"), _images()
    select_support(model, images, range(3), 1, "entropy", "image", cfg, run_pretext=False)
    assert capsys.readouterr().err == ""
    select_support(model, images, range(3), 1, "entropy", "image", cfg, run_pretext=False, progress=True)
    assert "[select: entropy scores] 3/3" in capsys.readouterr().err

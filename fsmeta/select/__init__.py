"""Support-set selection: which target images or patches to annotate (Dawoud et al. 2023, SPEC §4.6).

Pipeline: pseudo-labels (:mod:`.pseudo`) → pretext fine-tune on them
(:mod:`.pretext`) → score every patch of the unlabelled pool (:mod:`.scorers`:
``random``, ``entropy``, ``mc-dropout``, ``consistency``; or a set from θ′'s features,
:mod:`.diversity`: ``typiclust``, ``coverage``) → rank and take the
top |B| patches or whole images (:mod:`.selection`) → annotate → fine-tune.

For the benchmark (2023 protocol: a fixed 20% test split, the rest the pool)::

    from fsmeta.data.sampling import protocol_split
    from fsmeta.select import pretext_finetune, select_support, selection_crops, patch_budget

    pool, test = protocol_split(len(images), "2023", cfg.eval.test_fraction, split_seed)
    # θ' once per (target, pre-trained model): it sees only pixels, so it is shared
    # by every method, budget and split (select.pretext_images = "all", the paper).
    theta1 = pretext_finetune(model_from_checkpoint(ckpt)[0], images, cfg, seed=0)
    budget = patch_budget(images.name, K, cfg)            # unit="patch": patches-per-shot × K
    sel = select_support(theta1, images, pool, budget, method, "patch", cfg, seed,
                         run_pretext=False, exclude=test)  # or unit="image", budget=K
    x, y = selection_crops(images, sel, cfg)              # TRUE masks: the annotation
    finetune(copy.deepcopy(theta1), x, y, cfg.finetune, seed)   # every method fine-tunes θ'

Signatures:

- ``select_support(model_or_ckpt, images, pool_indices, budget, method, unit, cfg, seed=0, *,
  run_pretext=True, gamma=None, exclude=None) -> Selection``; the caller's model is never modified.
- ``selection_crops(images, selection, cfg, min_foreground=None) -> (x, y)``: float32
  tensors (N, 1, S, S), x in [-1, 1], y in {0, 1}.
- ``pretext_finetune(model, images, cfg, seed=0, *, indices=None, gamma=None) -> model`` (in place).
- ``patch_budget(dataset, shots, cfg) -> int``.
- :class:`Selection`: ``method``, ``unit``, ``budget``, ``ranking`` (every candidate
  :class:`Item` ``(image, y, x, height, width, score)``, best first), ``selected``,
  ``image_indices()``, ``annotated_pixels()`` (for equal-pixel-budget comparisons).

For a user: :func:`fsmeta.select.outputs.select_for_annotation` (``fsmeta select``).
"""

from fsmeta.select.pretext import pretext_finetune, pseudo_labelled
from fsmeta.select.pseudo import auto_gamma, dilate_2x2, equalise, kmeans_foreground, pseudo_label
from fsmeta.select.scorers import AUGMENTATIONS, SCORERS, ScoreContext, augment, score_patches
from fsmeta.select.selection import Item, Selection, item_name, patch_budget, patch_grid, select_support, selection_crops, selection_index

__all__ = [
    "AUGMENTATIONS", "SCORERS", "Item", "ScoreContext", "Selection", "augment", "auto_gamma", "dilate_2x2",
    "equalise", "item_name", "kmeans_foreground", "patch_budget", "patch_grid", "pretext_finetune",
    "pseudo_label", "pseudo_labelled", "score_patches", "select_support", "selection_crops", "selection_index",
]

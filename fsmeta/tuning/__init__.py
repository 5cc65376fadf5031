"""Ray Tune studies over the meta-learning hyper-parameters (α, β, ε, learning rates).

A search space is plain YAML, one configuration key per entry (``tune_spaces/``)::

    meta.alpha:    {loguniform: [0.001, 1.0]}
    meta.epsilon:  {uniform: [0.1, 1.0]}
    meta.variant:  {choice: [bce-er, all]}
    meta.inner_steps: {randint: [5, 31]}     # high bound excluded, as in Tune

Each trial meta-trains the target's sources with its own source actors. The trial
is reserved with ``tune.PlacementGroupFactory``: bundle 0 for the trial itself
(fine-tuning and validation), one bundle per source actor, so a trial never waits
for actors that a neighbour holds (an unreserved actor inside a trial hangs Tune).
Trials report validation mIoU as they meta-train, so ASHA can stop weak ones early,
and never read the 2023 protocol's test split (:mod:`~fsmeta.tuning.trial`). A
benchmark with ``eval.protocol=2023`` and the same split then scores the tuned
configuration on images tuning never saw.

The package, by concern: :mod:`~fsmeta.tuning.space` (search spaces),
:mod:`~fsmeta.tuning.trial` (one trial), :mod:`~fsmeta.tuning.resources` (a trial's
placement group), :mod:`~fsmeta.tuning.callback` (MLflow from the driver),
:mod:`~fsmeta.tuning.study` (``fsmeta tune``). Only ``callback`` and ``study``
import ray at module level.

MLflow: one parent run for the study; a nested run per trial with its sampled
values as params and ``val_miou`` per meta-iteration; the driver alone logs (a Tune
callback). ``OUT/best.yaml`` is the whole configuration with the best trial's
values, directly usable by ``fsmeta meta-train`` and ``fsmeta benchmark``;
``OUT/best.safetensors`` its last θ; ``OUT/trials.csv`` every trial.
"""

from fsmeta.tuning.resources import trial_resources
from fsmeta.tuning.space import Dimension, default_point, load_space, parse_space, with_values
from fsmeta.tuning.study import STATE_FILE, run_study
from fsmeta.tuning.trial import METRIC, TuneSplit, run_trial, tune_split, validation_score

__all__ = ["Dimension", "METRIC", "STATE_FILE", "TuneSplit", "default_point", "load_space", "parse_space", "run_study",
           "run_trial", "trial_resources", "tune_split", "validation_score", "with_values"]

"""Search spaces of Ray Tune studies: plain YAML, one configuration key per entry (``tune_spaces/``)::

    meta.alpha:    {loguniform: [0.001, 1.0]}
    meta.epsilon:  {uniform: [0.1, 1.0]}
    meta.variant:  {choice: [bce-er, all]}
    meta.inner_steps: {randint: [5, 31]}     # high bound excluded, as in Tune
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fsmeta.config import Config, ConfigError, config_from_dict

log = logging.getLogger(__name__)

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
# Keys a trial may not change: they define the target, its splits or where things are.
_FIXED = ("data.target", "data.sources", "data.root", "eval.test_fraction", "eval.split_seed", "tune.", "tracking.", "ray.", "study.")


@dataclasses.dataclass(frozen=True)
class Dimension:
    key: str  # a dotted configuration key, e.g. meta.alpha
    distribution: str
    args: tuple

    def domain(self):
        from ray import tune

        if self.distribution == "uniform":
            return tune.uniform(*self.args)
        if self.distribution == "loguniform":
            return tune.loguniform(*self.args)
        if self.distribution == "randint":
            return tune.randint(*self.args)
        return tune.choice(list(self.args))

    def contains(self, value: Any) -> bool:
        if self.distribution == "choice":
            return value in self.args
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        low, high = self.args
        return low <= value < high if self.distribution == "randint" else low <= value <= high


def parse_space(values: Any, cfg: Config, where: str = "search space") -> list[Dimension]:
    """Validate a search space (the mapping of a ``tune_spaces/*.yaml`` file) against ``cfg``.

    Raises:
        ConfigError: naming the file and key, for an unknown key or distribution, or bad bounds.
    """
    if not isinstance(values, dict) or not values:
        raise ConfigError(f"{where}: expected a mapping of configuration keys to distributions, e.g. 'meta.alpha: {{loguniform: [0.001, 1]}}'")
    flat = cfg.flat()
    dims = []
    for key, spec in values.items():
        key = str(key)
        at = f"{where}: {key}"
        if key not in flat:
            near = [k for k in flat if k.split(".")[-1] == key.split(".")[-1]]
            raise ConfigError(f"{at} is not a configuration key" + (f" (did you mean {', '.join(near)}?)" if near else ""))
        if any(key == f or key.startswith(f) for f in _FIXED):
            raise ConfigError(f"{at} cannot be tuned: it fixes the target, its splits or where the study runs")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{at}: expected one distribution, e.g. {{loguniform: [0.001, 1]}}; got {spec!r}")
        ((dist, args),) = spec.items()
        if dist not in DISTRIBUTIONS:
            raise ConfigError(f"{at}: unknown distribution {dist!r}; use one of {', '.join(DISTRIBUTIONS)}")
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{at}: {dist} expects a list, got {args!r}")
        if dist == "choice":
            dims.append(Dimension(key, dist, tuple(args)))
            continue
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args):
            raise ConfigError(f"{at}: {dist} expects [low, high] as two finite numbers, got {args!r}")
        low, high = args
        if not low < high:
            raise ConfigError(f"{at}: {dist} bounds [{low}, {high}] need low < high")
        if dist == "loguniform" and low <= 0:
            raise ConfigError(f"{at}: loguniform bounds [{low}, {high}] must be positive")
        if dist == "randint" and not (isinstance(low, int) and isinstance(high, int)):
            raise ConfigError(f"{at}: randint bounds [{low}, {high}] must be integers (high excluded)")
        dims.append(Dimension(key, dist, (low, high)))
    keys = {d.key for d in dims}
    if "finetune.epochs" in keys and "finetune.steps" not in keys and cfg.finetune.steps > 0:
        raise ConfigError(f"{where}: finetune.epochs has no effect while finetune.steps={cfg.finetune.steps} sets the fine-tuning "
                          "budget; search finetune.steps instead, or set finetune.steps=0 to fine-tune by epochs")
    if "finetune.steps_per_shot" in keys and "finetune.steps" not in keys and cfg.finetune.steps == 0:
        raise ConfigError(f"{where}: finetune.steps_per_shot has no effect while finetune.steps=0 fine-tunes by epochs; "
                          "set finetune.steps > 0 or search finetune.steps too")
    return dims


def load_space(path: str | Path, cfg: Config) -> list[Dimension]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"search space {p} does not exist")
    try:
        values = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    return parse_space(values, cfg, where=str(p))


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """``cfg`` with dotted keys replaced (a trial's sampled values), validated."""
    nested = cfg.to_dict()
    for key, value in values.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"{key} is not a configuration key")
        node[leaf] = value.item() if isinstance(value, np.generic) else value
    return config_from_dict(nested)


def default_point(cfg: Config, dims: list[Dimension]) -> dict[str, Any] | None:
    """The base configuration's value of every dimension (α and β: the variant's paper values),
    or None when one lies outside its range (then no defaults trial is run)."""
    alpha, beta = cfg.meta.loss_weights()
    flat = {**cfg.flat(), "meta.alpha": alpha, "meta.beta": beta}
    point = {d.key: flat[d.key] for d in dims}
    outside = [d.key for d in dims if not d.contains(point[d.key])]
    if outside:
        log.warning("tune: the defaults trial is skipped, %s lie outside the search space", ", ".join(f"{k}={point[k]}" for k in outside))
        return None
    return point

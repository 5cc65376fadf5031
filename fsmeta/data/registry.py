"""Which data sets exist, and opening them by name.

A name is either a prepared store under the data root or one of the synthetic
domains; a synthetic domain that is not prepared yet (or was prepared with other
generator settings) is generated on first use, so the embedded defaults work
with no setup.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fsmeta.config import Config, SynthConfig
from fsmeta.data import synth
from fsmeta.data.store import ImageSet, Record, list_stores, open_store, read_meta, write_store
from fsmeta.errors import DataError, FsmetaError

log = logging.getLogger(__name__)


def synth_params(cfg: SynthConfig) -> dict[str, int]:
    return {"images": cfg.images, "size": cfg.size, "seed": cfg.seed}


def write_synthetic(root: str | Path, domain: str, cfg: SynthConfig) -> Path:
    """Generate one synthetic domain into the store (streamed, atomic)."""

    def records():
        for i in range(cfg.images):
            # The same stream synth.generate uses, so the store equals generate(domain, n, size, seed).
            rng = np.random.default_rng([cfg.seed, synth.DOMAINS.index(domain), i])
            image, mask = synth.generate_pair(domain, rng, cfg.size)
            yield Record(
                id=f"{domain}-{i:04d}",
                image=(image * 255.0 + 0.5).astype("uint8"),
                mask=mask,
                split="train",
                source=f"synthetic:{domain}:seed={cfg.seed}:index={i}",
            )

    return write_store(
        root,
        domain,
        records(),
        kind="synthetic",
        image_dtype="uint8",
        extra_meta={"generator": synth_params(cfg), "description": synth.DESCRIPTIONS[domain]},
    )


def known_datasets(root: str | Path) -> list[str]:
    """Prepared stores plus the synthetic domains, without duplicates."""
    names = [m["name"] for m in list_stores(root)]
    return names + [d for d in synth.DOMAINS if d not in names]


def load_dataset(name: str, cfg: Config) -> ImageSet:
    """Open data set ``name`` under the configured root, generating synthetic domains on demand."""
    root = cfg.data.data_root()
    meta = read_meta(root, name)
    if name in synth.DOMAINS:
        wanted = synth_params(cfg.data.synth)
        if meta is None or meta.get("generator") != wanted:
            log.info("generating synthetic domain %s (%s) under %s", name, wanted, root)
            write_synthetic(root, name, cfg.data.synth)
    elif meta is None:
        raise DataError(
            f"unknown data set {name!r}: not prepared under {root} and not a synthetic domain; "
            f"known: {', '.join(known_datasets(root))}"
        )
    return open_store(root, name)


def resolve_sources(cfg: Config) -> list[str]:
    """The source data sets of a leave-one-out study: the configured list, or every
    other data set of the target's kind (synthetic with synthetic, real with real)."""
    target = cfg.data.target
    root = cfg.data.data_root()
    if target not in known_datasets(root):
        raise FsmetaError(f"unknown target {target!r}; known data sets: {', '.join(known_datasets(root))}")
    if cfg.data.sources:
        sources = list(cfg.data.sources)
        if target in sources:
            raise FsmetaError(f"target {target!r} is also listed as a source; the target must be left out")
        unknown = [s for s in sources if s not in known_datasets(root)]
        if unknown:
            raise FsmetaError(f"unknown source data set {unknown[0]!r}; known: {', '.join(known_datasets(root))}")
        if len(set(sources)) != len(sources):
            raise FsmetaError(f"data.sources lists a data set twice: {sources}")
        return sources
    if target in synth.DOMAINS:
        return [d for d in synth.DOMAINS if d != target]
    real = [m["name"] for m in list_stores(root) if m.get("kind") != "synthetic" and m["name"] != target]
    if not real:
        raise FsmetaError(f"target {target!r} has no other prepared data set to learn from; set data.sources")
    return real

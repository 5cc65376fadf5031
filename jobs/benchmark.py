"""Ray job: the whole leave-one-data-set-out study (``fsmeta benchmark``) on a Ray cluster.

Takes the options of ``fsmeta benchmark`` (see ``fsmeta benchmark --help``):
pre-trainings run once per (target, arch, pre-training) — meta-training on the
source actors — and every fine-tune/evaluate cell is a Ray task
(``study.cell_gpus`` of a GPU each). Submit from the repository root exactly as
``jobs/meta_train.py`` describes (auth, ``--working-dir`` limits, shared paths)::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/benchmark.py --config configs/paper.yaml \\
            --data-root /shared/fsmeta-data --out /shared/runs/paper \\
            --tracking-uri http://MLFLOW-HOST:5000

Re-submitting with ``--resume`` and the same ``--out`` skips every recorded cell
and continues the same MLflow parent run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsmeta.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))

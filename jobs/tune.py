"""Ray job: a Ray Tune study (``fsmeta tune``) on a Ray cluster.

Takes the options of ``fsmeta tune`` (see ``fsmeta tune --help``). Every trial
meta-trains with its own source actors, reserved together with the trial through
``tune.PlacementGroupFactory`` (bundle 0 the trial, one bundle per source), and
reports validation mIoU so ASHA stops weak trials; the target's test split is
never read. Submit from the repository root exactly as ``jobs/meta_train.py``
describes (auth, ``--working-dir`` limits, shared paths)::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/tune.py --space tune_spaces/reptile.yaml --config configs/paper.yaml \\
            --target tnbc --trials 32 --scheduler asha \\
            --data-root /shared/fsmeta-data --out /shared/runs/tune-tnbc \\
            --tracking-uri http://MLFLOW-HOST:5000

``--out`` must be on storage every node reaches (Tune keeps its experiment state
and the trials' checkpoints there). Re-submitting with ``--resume`` and the same
``--out`` restores the study with Tune's restore: finished trials are kept,
unfinished ones continue from their last checkpoint, and their MLflow runs continue.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsmeta.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))

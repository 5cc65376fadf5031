"""Ray job: Reptile meta-training on a Ray cluster, one actor per source data set.

Takes the options of ``fsmeta meta-train`` (see ``fsmeta meta-train --help``);
``--backend ray`` unless given otherwise. Inside a job, ``RAY_ADDRESS`` points at
the cluster, so the driver attaches to it instead of starting a local Ray.

Submit from the repository root (needs ``ray[default]`` on the client)::

    # a cluster started with token auth (Ray 2.60 turns it on when ~/.ray/auth_token
    # exists on the head, and always for clusters started by ray.init()):
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(ssh head cat ~/.ray/auth_token)
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/meta_train.py --config configs/paper.yaml \\
            --data-root /shared/fsmeta-data --out /shared/runs/meta \\
            --tracking-uri http://MLFLOW-HOST:5000

    # a single-machine head without auth, reachable on loopback only:
    RAY_AUTH_MODE=disabled ray start --head --node-ip-address=127.0.0.1 \\
        --dashboard-host=127.0.0.1 --include-dashboard=true
    RAY_AUTH_MODE=disabled ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/meta_train.py --config configs/demo.yaml --out "$PWD/runs/meta"

What to pass:
- ``--out``, ``--data-root`` and the MLflow URI must name places every node can
  reach (shared storage, an MLflow server): a job runs in an unpacked copy of the
  working directory that is deleted afterwards, so relative paths, ``./data`` and
  ``sqlite:///mlflow.db`` would land there and be lost. ``--resume`` with the same
  ``--out`` continues an interrupted run (same θ, same MLflow run).
- The upload of ``--working-dir`` is capped at 100 MiB; ``.rayignore`` (and
  ``.gitignore``) keep ``data/``, ``mlflow.db``, ``mlruns/`` and ``*.safetensors`` out.
- The client and cluster must agree on ``RAY_AUTH_MODE``: a token-auth cluster
  rejects a client without ``RAY_AUTH_MODE=token`` and a token
  (``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``); with ``disabled`` anyone who can
  reach the ports can run code, so bind such a head to 127.0.0.1.
"""

from __future__ import annotations

import sys
from pathlib import Path

# A job runs `python jobs/meta_train.py` in the unpacked working directory: make the
# fsmeta package beside jobs/ importable even where it is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsmeta.cli import main  # noqa: E402


def job_argv(argv: list[str]) -> list[str]:
    """``fsmeta meta-train`` arguments for this job: the given ones, with ``--backend ray`` by default."""
    backend = [] if any(a == "--backend" or a.startswith("--backend=") for a in argv) else ["--backend", "ray"]
    return ["meta-train", *backend, *argv]


if __name__ == "__main__":
    sys.exit(main(job_argv(sys.argv[1:])))

"""MLflow for Tune studies, from the driver: a nested run per trial under the study's parent run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.tune import Callback

from fsmeta.atomic import atomic_write_bytes
from fsmeta.compute import compute_tags
from fsmeta.tracking import Tracker
from fsmeta.tuning.trial import METRIC


class TrialRuns(Callback):
    """A Tune callback that gives every trial a nested MLflow run.

    Tune calls it in the driver, so the driver alone logs. It is pickled with the study
    (``Tuner.restore``), so it holds only plain values and opens its tracker lazily;
    the trial → run map lives in ``OUT/study.json`` so a resumed study continues the same runs.
    """

    def __init__(self, uri: str, experiment: str, enabled: bool, parent: str, state_path: str, iterations: int) -> None:
        self.uri, self.experiment, self.enabled = uri, experiment, enabled
        self.parent, self.state_path, self.iterations = parent, state_path, iterations
        self._tracker: Tracker | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tracker": None}

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.uri, self.experiment, self.enabled)
        return self._tracker

    def _runs(self) -> dict[str, Any]:
        return json.loads(Path(self.state_path).read_text())

    def _run_id(self, trial) -> str:
        return self._runs().get("trials", {}).get(trial.trial_id, "")

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        state = self._runs()
        known = state.setdefault("trials", {}).get(trial.trial_id)
        if known:
            self.tracker.resume_run(known)
            return
        run_id = self.tracker.start_run(f"trial {trial.trial_id}", params=dict(trial.config), parent_run_id=self.parent,
                                        tags={"fsmeta.kind": "trial", "fsmeta.trial_id": trial.trial_id})
        state["trials"][trial.trial_id] = run_id
        atomic_write_bytes(Path(self.state_path), (json.dumps(state, indent=2) + "\n").encode())

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        metrics = {k: float(v) for k, v in result.items()
                   if k.startswith(METRIC) or k in ("meta_loss", "sec_per_iter")}
        run_id = self._run_id(trial)
        self.tracker.log_metrics(run_id, metrics, step=int(result.get("meta_iteration", 0)))
        how = result.get("compute")
        if isinstance(how, dict) and how:  # how the trial computed (fsmeta.compute.describe), as a cell run is tagged
            self.tracker.set_tags(run_id, compute_tags(how))

    def _finished(self, trial) -> None:
        # Tune calls on_trial_complete/on_trial_error only for a trial that ran to its end, was
        # stopped by the scheduler or failed for good — never for one cut off by Ctrl-C (which
        # Tune nevertheless marks TERMINATED), so this list is how run_study tells the two apart.
        state = self._runs()
        done = state.setdefault("finished", [])
        if trial.trial_id not in done:
            done.append(trial.trial_id)
            atomic_write_bytes(Path(self.state_path), (json.dumps(state, indent=2) + "\n").encode())

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = int((trial.last_result or {}).get("meta_iteration", 0))
        run_id = self._run_id(trial)
        self.tracker.set_tags(run_id, {"fsmeta.stopped_early": str(last < self.iterations).lower(), "fsmeta.iterations": str(last)})
        self.tracker.end_run(run_id, "FINISHED")
        self._finished(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.tracker.end_run(self._run_id(trial), "FAILED")
        self._finished(trial)

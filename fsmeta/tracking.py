"""MLflow tracking: the only module that imports mlflow.

Everything goes through ``MlflowClient`` with explicit run ids instead of the
fluent API, which keeps global state and is not thread-safe: the driver alone
logs, runs nest by the ``mlflow.parentRunId`` tag, and a run is always ended
(FINISHED, FAILED or KILLED) even when the code inside fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

DEFAULT_URI = "sqlite:///mlflow.db"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

log = logging.getLogger(__name__)

# MLflow rejects param values longer than this, and batches of more metrics than this.
_MAX_PARAM = 6000
_MAX_METRICS_PER_BATCH = 1000
# MLflow 3's UI opens an experiment by its kind: without the tag it guesses, and an
# experiment without traces may land on the GenAI overview instead of the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


def resolve_uri(uri: str = "") -> str:
    """The explicit URI, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def check_store_exists(tracking_uri: str, wanted: str) -> None:
    """Refuse to read from a SQLite tracking store that does not exist: opening it would
    create an empty ``mlflow.db`` (in the working directory, by default) and then fail."""
    from fsmeta.errors import FsmetaError

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.is_file():
            raise FsmetaError(f"cannot read {wanted}: the MLflow tracking store {db} does not exist "
                              "(give --tracking-uri, or set MLFLOW_TRACKING_URI, to the store that holds the run)")


class Tracker:
    """Logs runs to one MLflow experiment; a disabled tracker accepts every call and logs nothing."""

    def __init__(self, uri: str = "", experiment: str = "fsmeta", enabled: bool = True) -> None:
        self.enabled = enabled
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self._client = None
        self._experiment_id: str | None = None
        self._monitors: dict[str, Any] = {}

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            # Quieten the database-migration chatter of a fresh sqlite store.
            logging.getLogger("alembic").setLevel(logging.WARNING)
            self._client = MlflowClient(tracking_uri=self.uri)
            found = self._client.get_experiment_by_name(self.experiment)
            if found is None:
                self._experiment_id = self._client.create_experiment(self.experiment, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
            else:
                self._experiment_id = found.experiment_id
                if EXPERIMENT_KIND_TAG not in (found.tags or {}):  # older fsmeta experiments; a kind someone chose stays
                    self._client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return self._client

    def runs_page(self, port: int = 5000) -> str:
        """The address of this experiment's runs table in a local ``mlflow ui`` on ``port``. MLflow 3's
        UI opens a bare experiment link on the GenAI overview until a browser has chosen *Model
        training*; ``workflowType=machine_learning`` opens the runs table directly."""
        self.client  # noqa: B018 — resolves (or creates) the experiment
        return f"http://127.0.0.1:{port}/#/experiments/{self._experiment_id}?workflowType=machine_learning"

    def start_run(
        self,
        name: str,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
        system_metrics: bool = False,
    ) -> str:
        """Create a run (nested under ``parent_run_id`` when given) and return its id ("" when disabled)."""
        if not self.enabled:
            return ""
        all_tags = {"mlflow.runName": name, **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self._experiment_id, tags=all_tags, run_name=name)
        run_id = run.info.run_id
        if params:
            self.log_params(run_id, params)
        if system_metrics:
            self._start_system_metrics(run_id)
        return run_id

    def resume_run(self, run_id: str, system_metrics: bool = False) -> str:
        """Mark an existing run RUNNING again, e.g. when a meta-training run is resumed."""
        if not self.enabled or not run_id:
            return run_id
        self.client.update_run(run_id, status="RUNNING")
        if system_metrics:
            self._start_system_metrics(run_id, resume=True)
        return run_id

    def _start_system_metrics(self, run_id: str, resume: bool = False) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=self.uri)
            monitor.start()
            self._monitors[run_id] = monitor
        except Exception as exc:  # psutil missing or an unsupported platform: metrics are optional
            log.warning("system metrics are off for run %s: %s", run_id, exc)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        if not self.enabled or not run_id or not params:
            return
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:_MAX_PARAM]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.enabled or not run_id or not metrics:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items()]
        for start in range(0, len(items), _MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=items[start : start + _MAX_METRICS_PER_BATCH])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        if not self.enabled or not run_id:
            return
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled or not run_id:
            return
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_table(self, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """A table (one dict per row) as a JSON table artifact, which the MLflow UI shows as a table."""
        if not self.enabled or not run_id or not rows:
            return
        columns = list(dict.fromkeys(k for r in rows for k in r))
        self.client.log_table(run_id, data={c: [r.get(c) for r in rows] for c in columns}, artifact_file=artifact_file)

    def register_model(self, run_id: str, checkpoint: str | Path, name: str) -> int:
        """Log ``checkpoint`` (and its ``.json`` description) under the run's ``model/`` artifacts and
        register that folder as a new version of model ``name``; returns the version number, so that
        ``models:/<name>/<version>`` names the weights for ``fsmeta predict``."""
        from fsmeta.errors import FsmetaError

        if not self.enabled or not run_id:
            raise FsmetaError(f"--register {name} needs MLflow tracking; drop --no-tracking")
        checkpoint = Path(checkpoint)
        self.client.log_artifact(run_id, str(checkpoint), "model")
        sidecar = checkpoint.with_suffix(".json")
        if sidecar.is_file():
            self.client.log_artifact(run_id, str(sidecar), "model")
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name, description="fsmeta segmentation weights (.safetensors)")
        source = f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/model"
        version = self.client.create_model_version(name, source=source, run_id=run_id,
                                                   tags={"fsmeta.checkpoint": checkpoint.name})
        return int(version.version)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        if not self.enabled or not run_id:
            return
        monitor = self._monitors.pop(run_id, None)
        if monitor is not None:
            monitor.finish()
        self.client.set_terminated(run_id, status=status)

    @contextlib.contextmanager
    def run(self, name: str, **kwargs: Any) -> Iterator[str]:
        """``with tracker.run("meta-train", params=...) as run_id:``; ends FAILED or KILLED on error."""
        run_id = self.start_run(name, **kwargs)
        try:
            yield run_id
        except KeyboardInterrupt:
            self.end_run(run_id, "KILLED")
            raise
        except BaseException:
            self.end_run(run_id, "FAILED")
            raise
        self.end_run(run_id, "FINISHED")


class RecordingTracker(Tracker):
    """A tracker for a unit of work run away from the driver (a Ray task of the graph scheduler):
    it logs nothing, records every call against the one run the driver created for it
    (``run_id``; "" when tracking is off), and :meth:`replay` logs them from the driver, the
    only process that talks to MLflow. Metrics keep their steps, not their times."""

    def __init__(self, run_id: str) -> None:
        super().__init__(enabled=bool(run_id))
        self.run_id = run_id
        self.calls: list[tuple[str, tuple]] = []

    def start_run(self, name: str, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
                  parent_run_id: str | None = None, system_metrics: bool = False) -> str:
        if self.run_id:
            self.calls.append(("set_tags", ({"mlflow.runName": name, **(tags or {})},)))
            if params:
                self.calls.append(("log_params", (params,)))
        return self.run_id

    def resume_run(self, run_id: str, system_metrics: bool = False) -> str:
        return run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        if run_id:
            self.calls.append(("log_params", (dict(params),)))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        if run_id:
            self.calls.append(("log_metrics", ({k: float(v) for k, v in metrics.items()}, step)))

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        if run_id:
            self.calls.append(("set_tags", (dict(tags),)))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        if run_id:
            self.calls.append(("log_artifact", (str(path), artifact_path)))

    def log_table(self, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
        if run_id and rows:
            self.calls.append(("log_table", ([dict(r) for r in rows], artifact_file)))

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        if run_id:
            self.calls.append(("end_run", (status,)))

    @staticmethod
    def replay(tracker: Tracker, run_id: str, calls: list[tuple[str, tuple]]) -> None:
        """Log ``calls`` (a unit's record) to ``run_id`` through the driver's ``tracker``."""
        for method, args in calls:
            getattr(tracker, method)(run_id, *args)


def tracker_from_config(tracking_cfg: Any) -> Tracker:
    return Tracker(tracking_cfg.uri, tracking_cfg.experiment, tracking_cfg.enabled)


def download_artifact(uri: str, tracking_uri: str = "", dst: str | Path | None = None) -> Path:
    """Download an MLflow artifact (``runs:/<run id>/<path>``, ``models:/<name>/<version>``,
    ``mlflow-artifacts:/…``) to ``dst`` (default: a new temporary folder) and return its local path.

    Raises :class:`~fsmeta.errors.FsmetaError` naming the URI when the run or artifact does not exist.
    """
    import tempfile

    import mlflow.artifacts

    from fsmeta.errors import FsmetaError

    logging.getLogger("alembic").setLevel(logging.WARNING)
    check_store_exists(resolve_uri(tracking_uri), uri)
    target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="fsmeta-artifact-"))
    target.mkdir(parents=True, exist_ok=True)
    try:
        source = _model_version_source(uri, resolve_uri(tracking_uri)) if uri.startswith("models:/") else uri
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(target), tracking_uri=resolve_uri(tracking_uri))
    except Exception as exc:  # MlflowException, OSError: the message says which run or path is missing
        raise FsmetaError(f"cannot download {uri} from MLflow at {resolve_uri(tracking_uri)}: {exc}") from None
    return Path(local)


def _model_version_source(uri: str, tracking_uri: str) -> str:
    """Where the files of ``models:/<name>/<version>`` (or ``/latest``, or ``models:/<name>@<alias>``) lie.

    Resolved with a client whose registry is the tracking store: ``download_artifacts``
    alone looks ``models:/`` up in the process-wide registry URI, not the one given.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        version = client.get_model_version_by_alias(name, alias).version
    else:
        name, _, version = rest.rpartition("/")
        if version == "latest":
            version = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    if not name:
        raise ValueError(f"{uri} does not name a model version (models:/<name>/<version>)")
    return client.get_model_version_download_uri(name, str(version))

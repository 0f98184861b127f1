"""Experiment tracking: a run's settings, per-round figures and files in MLflow or TensorBoard.

Optional (`pip install -e ".[tracking]"`) and written by the ServerApp alone, after each
round. `tracking-uri` says where ("" = inside `results-dir`: MLflow's database
`mlflow.db` with its files in `mlartifacts/`, or TensorBoard's `tensorboard/`). One MLflow
experiment (`tracking-experiment`, by default `fedkdlora-<task>`; `fedkdlora-compare` uses
its output folder's name) holds one run per results file, named like it. A tracker that
fails is logged and recorded in `run.tracking.errors`; it never ends the run.
"""

from __future__ import annotations

import importlib.util
from logging import WARNING
from pathlib import Path
from typing import Any, Protocol

from flwr.common.logger import log

from fedkdlora_app.config import ConfigError, RunConfig, RunControlSettings
from fedkdlora_app.results_format import Round, TrackingInfo

BACKENDS = {"mlflow": "mlflow", "tensorboard": "tensorboard"}  # tracking value -> module it needs
KEYS = ("tracking", "tracking-uri", "tracking-experiment")  # where a run is tracked, not what it computes
# Parts of a round that are maps by node or lists, not figures of the round.
_NOT_FIGURES = ("per_node", "placement", "params_per_message", "client_ranks")


def round_metrics(entry: Round) -> dict[str, float]:
    """Every number of a round, by its path in the results JSON (`server/student/accuracy`,
    `communication/up_bytes`, `distillation/last_step/kl_teacher_student`, `epsilon`, ...)."""
    figures: dict[str, float] = {"failures": float(len(entry["failures"]))}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key not in _NOT_FIGURES:
                    walk(item, f"{path}/{key}" if path else key)
        elif isinstance(value, int | float):  # bool included: an int
            figures[path] = float(value)

    walk({k: v for k, v in entry.items() if k not in ("round", "failures")}, "")
    return figures


def default_uri(config: RunControlSettings) -> str:
    """Where a tracker writes unless `tracking-uri` says otherwise: inside `results-dir`."""
    results = Path(config.results_dir).resolve()
    if config.tracking == "mlflow":
        return f"sqlite:///{results / 'mlflow.db'}"
    return str(results / "tensorboard")


def check_tracking(config: RunControlSettings) -> None:
    """Before a run: the tracker's package must be installed where the run is checked."""
    module = BACKENDS.get(config.tracking)
    if module is not None and importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"run-config key 'tracking' = '{config.tracking}': the {module} package is not installed; "
            "pip install -e '.[tracking]'"
        )


class Backend(Protocol):
    def log_round(self, server_round: int, metrics: dict[str, float]) -> None: ...
    def log_files(self, paths: list[Path]) -> None: ...
    def close(self, status: str) -> None: ...


class MlflowBackend:
    """One MLflow run in the experiment, through `MlflowClient` (no process-wide MLflow state)."""

    def __init__(
        self, uri: str, experiment: str, run_name: str, params: dict[str, Any], results: Path
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:  # files beside a database inside results-dir; elsewhere the server's default
            artifacts = (results / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
            experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        for key, value in params.items():
            self.client.log_param(self.run_id, key, value)

    def log_round(self, server_round: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        batch = [Metric(key, value, 0, server_round) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_files(self, paths: list[Path]) -> None:
        for path in paths:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if status == "completed" else "FAILED")


class TensorBoardBackend:
    """The same scalars in TensorBoard event files, one folder per run under `<uri>/<experiment>/`."""

    def __init__(self, uri: str, experiment: str, run_name: str, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(uri) / experiment / run_name
        self.run_id = run_name
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        rows = "\n".join(f"| {key} | {value} |" for key, value in params.items())
        self.writer.add_text("run-config", "| key | value |\n|---|---|\n" + rows, 0)

    def log_round(self, server_round: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, server_round)
        self.writer.flush()

    def log_files(self, paths: list[Path]) -> None:
        """TensorBoard keeps scalars, not files: the results JSON says where they are."""

    def close(self, status: str) -> None:
        self.writer.close()


def attach_files(info: TrackingInfo, paths: list[Path], folder: str) -> str | None:
    """Add `paths` (e.g. the plots `fedkdlora-run --report` draws) to the MLflow run a results JSON
    names, under `folder`; TensorBoard keeps no files. A failure is returned as a line, not raised."""
    if info.get("backend") != "mlflow" or "run_id" not in info:
        return None
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(info["uri"])
        for path in paths:
            client.log_artifact(info["run_id"], str(path), artifact_path=folder)
    except Exception as error:  # tracking never fails the command that asked for it
        return f"tracking: could not attach {folder} to MLflow run {info['run_id']}: {error}"
    return None


class Tracker:
    """The run's tracker, or none: every call is guarded, a failure is recorded and tracking stops."""

    def __init__(self, config: RunConfig, run_name: str, info: TrackingInfo) -> None:
        self.info = info  # the results JSON's `run.tracking`, updated in place
        self.backend: Backend | None = None
        if not config.tracking:
            return
        uri = config.tracking_uri or default_uri(config)
        experiment = config.tracking_experiment or f"fedkdlora-{config.task}"
        info.update(backend=config.tracking, uri=uri, experiment=experiment, errors=[])
        params = config.to_dict()

        def start() -> None:
            if config.tracking == "mlflow":
                backend: Backend = MlflowBackend(uri, experiment, run_name, params, Path(config.results_dir))
            else:
                backend = TensorBoardBackend(uri, experiment, run_name, params)
            self.backend = backend
            info["run_id"] = backend.run_id

        self._guarded("start", start)

    def log_round(self, entry: Round) -> None:
        if self.backend is not None:
            server_round = entry["round"]
            self._guarded(f"round {server_round}", self.backend.log_round, server_round, round_metrics(entry))

    def finish(self, status: str, files: list[Path]) -> None:
        """Attach `files` (the results JSON, the saved models) and close the run as `status`."""
        if self.backend is not None:
            self._guarded("files", self.backend.log_files, [p for p in files if p.exists()])
        if self.backend is not None:
            self._guarded("close", self.backend.close, status)

    def _guarded(self, what: str, call: Any, *args: Any) -> None:
        try:
            call(*args)
        except Exception as error:  # a tracker must never end the run
            message = f"{self.info.get('backend')} {what}: {type(error).__name__}: {error}"
            log(WARNING, "tracking stopped: %s", message)
            self.info.setdefault("errors", []).append(message)
            self.backend = None

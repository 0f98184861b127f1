"""The results JSON's layout, defined once: what `results.RunRecorder` writes and every reader reads.

Keys are snake_case throughout, except inside `config`, which holds the run-config under
its own (kebab-case) names as in `pyproject.toml`. docs/results-format.md describes each
field; `tests/test_results_format.py` checks that it names every field defined here.

Files of an older `schema_version` are read through `load`, which upgrades them: resume
and plotting keep working on runs written before the current layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NotRequired, TypedDict

SCHEMA_VERSION = 2


class Health(TypedDict):
    rounds: int
    rounds_without_update: list[int]
    failures: int


class TrackingInfo(TypedDict, total=False):
    backend: str  # mlflow / tensorboard
    uri: str
    experiment: str
    run_id: str  # MLflow's run id; TensorBoard's run folder name
    errors: list[str]  # a tracker that failed: what failed (the run went on)


class Resume(TypedDict):
    at: str
    after_round: int
    previous_status: str
    previous_error: str | None
    discarded_unfinished_rounds: list[int]
    tracking: NotRequired[TrackingInfo]  # where the run was tracked before this resume


class RunInfo(TypedDict):
    name: str
    status: str  # running / completed / failed
    error: str | None
    started_at: str
    finished_at: str | None
    wall_seconds_total: float | None
    resumes: list[Resume]
    health: NotRequired[Health]
    tracking: NotRequired[TrackingInfo]
    stop_reason: NotRequired[str]  # a run that ended before num-server-rounds (its privacy budget)


class Privacy(TypedDict):
    mechanism: str
    noise_multiplier: float
    clipping_norm: float
    sampled_clients: int
    noise_std: float
    delta: float
    target_epsilon: float
    accountant: str
    weights: str


class ModelInfo(TypedDict, total=False):
    server_device: str
    student_parameters: int
    student_layers: int
    shipped_parameters: int
    shipped_bytes_per_message: int
    eval_examples: int
    public_examples: int
    public_labelled_examples: int
    client_pool_examples: int
    privacy: Privacy


class EvalMetrics(TypedDict):
    loss: float
    accuracy: float
    mcc: float
    num_examples: int
    tn: int
    fp: int
    fn: int
    tp: int


class TeacherInfo(TypedDict, total=False):
    task: str
    base_model: str
    teacher_data_pct: float
    public_labelled_pct: float
    public_examples: int
    epochs: int
    lr: float
    seed: int
    train_loss: float
    train_seconds: float
    dev: EvalMetrics


class TrainMetrics(TypedDict):
    train_loss: float
    num_examples: int
    train_seconds_max: float
    train_seconds_sum: float
    train_examples_seen: int


class ClientMetrics(TypedDict, total=False):
    train: TrainMetrics
    evaluate: EvalMetrics


class LossTerms(TypedDict):
    loss: float
    ce_student: float
    ce_teacher: float
    kl_teacher_student: float
    kl_student_teacher: float
    attention_mse: float


class Distillation(TypedDict):
    teacher_train_loss: float
    last_step: LossTerms | dict[str, float]  # {} when no mutual step ran
    seconds: float
    teacher_seconds: float
    mutual_seconds: float
    overlapped: bool
    critical_path_seconds: float
    teacher_wait_seconds: float


class NodeBytes(TypedDict):
    down_bytes: int
    up_bytes: int


class Communication(TypedDict):
    down_bytes: int
    up_bytes: int
    down_bytes_train: int
    down_bytes_evaluate: int
    down_bytes_teacher: int
    params_per_message: dict[str, int]  # per stage: train, evaluate
    per_node: dict[str, NodeBytes]  # per node id
    cumulative_down_bytes: NotRequired[int]
    cumulative_up_bytes: NotRequired[int]


class Failure(TypedDict):
    stage: str
    node_id: int
    reason: str


class Placement(TypedDict):
    device: str
    ray_gpu_ids: str
    ray_node_id: NotRequired[str]  # the Ray node (raylet) of a simulated client; "" elsewhere
    cuda_visible_devices: str
    pid: int
    peak_accelerator_memory_bytes: int
    started: float
    finished: float


class Aggregation(TypedDict):
    method: str  # lora-aggregation
    error: float  # ||new global update - exact mean of the clients' updates||_F / ||exact mean update||_F
    rank: NotRequired[int]  # svd: the global rank
    client_ranks: NotRequired[list[int]]
    truncation_error: NotRequired[float]
    max_module_truncation_error: NotRequired[float]
    residual_rank: NotRequired[int]  # exact: 0 = dense residual
    residual_elements: NotRequired[int]
    residual_truncation_error: NotRequired[float]


class Round(TypedDict):
    round: int
    wall_seconds: float | None
    server: dict[str, EvalMetrics]  # student; FedKDLoRA also teacher
    clients: ClientMetrics
    communication: Communication
    failures: list[Failure]
    placement: NotRequired[dict[str, dict[str, Placement]]]  # node id -> stage -> placement
    aggregated_updates: NotRequired[int]
    sampled_partitions: NotRequired[dict[str, list[int]]]  # partial participation: stage -> partitions
    distillation: NotRequired[Distillation]
    aggregation: NotRequired[Aggregation]
    epsilon: NotRequired[float]  # DP: the run's ε after this round, at model.privacy.delta


class Artifacts(TypedDict, total=False):
    student: str
    student_base: str
    teacher: str
    pretrained_teacher: str


class ResultsDocument(TypedDict):
    schema_version: int
    run: RunInfo
    config: dict[str, Any]  # the run-config, kebab-case keys as in pyproject.toml
    versions: dict[str, str]
    model: ModelInfo
    teacher: TeacherInfo | None
    rounds: list[Round]
    artifacts: Artifacts


def snake_keys(value: Any) -> Any:
    """`value` with every dict key's `-` made `_`, at every depth."""
    if isinstance(value, dict):
        return {str(key).replace("-", "_"): snake_keys(item) for key, item in value.items()}
    if isinstance(value, list):
        return [snake_keys(item) for item in value]
    return value


def upgrade(data: dict[str, Any]) -> ResultsDocument:
    """A results document of any known `schema_version` in the current layout.

    Version 1 differs only in key style: kebab-case keys outside `config` (e.g.
    `num-examples`, `last-step`, `ray-gpu-ids`).
    """
    version = data.get("schema_version")
    if version == SCHEMA_VERSION:
        return data  # type: ignore[return-value]
    if version != 1:
        raise ValueError(f"results JSON schema_version {version!r}: this code reads 1 and {SCHEMA_VERSION}")
    upgraded = {key: value if key == "config" else snake_keys(value) for key, value in data.items()}
    return upgraded | {"schema_version": SCHEMA_VERSION}  # type: ignore[return-value]


def load(path: Path) -> ResultsDocument:
    """A results JSON, in the current layout whatever version wrote it; ValueError naming the file if
    it is none."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not {"schema_version", "rounds", "config"} <= set(data):
        raise ValueError(f"{path}: not a fedkdlora results JSON (no 'schema_version', 'rounds' or 'config')")
    try:
        return upgrade(data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None

"""Typed, validated view of `[tool.flwr.app.config]`.

Flower hands every app a flat `run_config` mapping. Reading it through one frozen
dataclass gives every module the same names and types, makes a bad value fail before
any model is loaded, and (being hashable) lets per-process caches key on it safely.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedkdlora_app.errors import ConfigError

SCHEMES = ("fedavg", "fedlora", "fedkdlora")
TASKS = ("cola", "sst2")
# Run-config keys renamed to say what they are: old name -> new name. The old names are still
# accepted, with a one-line notice (`with_current_names`), and results files that use them resume.
RENAMED_KEYS = {"teacher-lr": "teacher-pretrain-lr", "distill-lr": "distill-teacher-lr"}


def with_current_names(
    values: Mapping[str, Any], notice: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """`values` with each old key name replaced by its new one (the old name's value wins: it was
    given explicitly over a default); `notice` receives one line per old name used."""
    current = dict(values)
    for old, new in RENAMED_KEYS.items():
        if old in current:
            current[new] = current.pop(old)
            if notice is not None:
                notice(f"run-config key '{old}' is now '{new}'; the old name still works")
    return current


# "seed" is the old name of "contiguous" (the file-order split), still accepted.
PARTITIONINGS = ("contiguous", "seed", "iid", "dirichlet")
LORA_AGGREGATIONS = ("naive", "svd", "alternating", "exact")
WIRE_DTYPES = ("float32", "float16", "bfloat16")
DP_CLIPPINGS = ("server", "client")
PRECISIONS = ("float32", "bfloat16")
# What reaches the student in FedKDLoRA's server step: the public labels, the teacher, or both.
SERVER_STUDENT_SIGNALS = ("labels+teacher", "labels", "teacher")
KD_LOSSES = ("kl", "original")
TRACKINGS = ("", "mlflow", "tensorboard")
# What a SuperNode's node config may set (`NodeRun`, `RunConfig.client_rank`); deploy/start-supernode.sh
# has an option for each.
NODE_CONFIG_KEYS = (
    "partition-id",
    "num-partitions",
    "data-dir",
    "student-model",
    "teacher-path",
    "cache-dir",
    "lora-r",
)


CHECKPOINT_FILE = "checkpoint.pt"


def run_dir_of(results_json: Path) -> Path:
    """A run's folder (models, checkpoint) sits beside its results JSON, with the same name."""
    return results_json.with_suffix("")


def app_defaults(app_dir: Path) -> dict[str, Any]:
    """`[tool.flwr.app.config]` of the app's pyproject.toml: the one home of the defaults."""
    from flwr.common.config import get_project_config

    return dict(get_project_config(app_dir)["tool"]["flwr"]["app"]["config"])


@dataclass(frozen=True)
class SchemeSettings:
    """Which scheme runs on which task, for how long, from which seed."""

    # --- Scheme and task
    scheme: str
    task: str
    num_server_rounds: int
    seed: int


@dataclass(frozen=True)
class StudentSettings:
    """The student model and its LoRA adapter (the global rank)."""

    # --- Student and LoRA
    student_model: str
    student_layers: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: str


@dataclass(frozen=True)
class LoraVariantSettings:
    """How LoRA adapters are averaged and what dtype travels (`aggregation.py`)."""

    # --- LoRA variants and the wire
    lora_aggregation: str
    lora_residual_rank: int
    lora_freeze_a: bool
    lora_r_by_partition: str
    wire_dtype: str


@dataclass(frozen=True)
class ClientTrainingSettings:
    """What each client does with its partition every round."""

    # --- Client training
    local_epochs: int
    client_lr: float
    lora_client_lr: float
    batch_size: int
    length_grouped_batches: bool
    max_seq_length: int
    precision: str


@dataclass(frozen=True)
class DataSettings:
    """The GLUE data, the public slice, the partitions and client sampling."""

    # --- Data, partitions and sampling
    data_dir: str
    teacher_data_pct: float
    partitioning: str
    dirichlet_alpha: float
    fraction_train: float
    fraction_evaluate: float
    min_available_nodes: int
    max_train_examples_per_client: int
    max_eval_examples: int
    centralized_public: bool


@dataclass(frozen=True)
class ServerStepSettings:
    """FedKDLoRA's teacher and its server step (ignored by fedavg / fedlora)."""

    # --- FedKDLoRA server step: teacher, public slice, mutual distillation (ignored by fedavg / fedlora)
    teacher_model: str
    teacher_base_model: str
    teacher_pretrain_epochs: int
    teacher_pretrain_lr: float
    teacher_epochs: int
    kd_epochs: int
    distill_teacher_lr: float
    distill_student_lr: float
    max_public_examples: int
    public_labelled_pct: float
    server_student_signal: str
    kd_loss: str
    server_step_overlap: bool


@dataclass(frozen=True)
class ClientKdSettings:
    """FedKDLoRA's optional client-side distillation from the frozen teacher."""

    # --- Client KD (FedKDLoRA): clients also distil from a frozen copy of the pre-trained teacher
    client_kd: bool
    kd_alpha: float
    kd_temperature: float


@dataclass(frozen=True)
class PrivacySettings:
    """Central DP through Flower's fixed-clipping wrappers (`privacy.py`)."""

    # --- Central differential privacy: Flower's fixed-clipping wrappers around the strategy
    dp_noise_multiplier: float
    dp_clipping_norm: float
    dp_clipping: str
    dp_delta: float
    dp_target_epsilon: float


@dataclass(frozen=True)
class RunControlSettings:
    """Where results go, resuming, timeouts, progress lines and tracking."""

    # --- Run control: results, resume, timeouts, progress, tracking
    results_dir: str
    resume_from: str
    round_timeout: float
    progress_interval: float
    tracking: str
    tracking_uri: str
    tracking_experiment: str


# The groups in pyproject.toml's order: a function that reads one group takes it as its type
# (every RunConfig is one), e.g. `models.lora_config(settings: StudentSettings, ...)`.
SETTINGS_GROUPS = (
    SchemeSettings,
    StudentSettings,
    LoraVariantSettings,
    ClientTrainingSettings,
    DataSettings,
    ServerStepSettings,
    ClientKdSettings,
    PrivacySettings,
    RunControlSettings,
)


@dataclass(frozen=True)
class RunConfig(  # bases last group first: a dataclass lists its bases' fields in reverse order
    RunControlSettings,
    PrivacySettings,
    ClientKdSettings,
    ServerStepSettings,
    DataSettings,
    ClientTrainingSettings,
    LoraVariantSettings,
    StudentSettings,
    SchemeSettings,
):
    """All run-config keys: the groups of pyproject.toml, which holds the defaults and their meaning,
    as base classes, so the fields keep pyproject's order (`tests/test_config.py` checks that the
    two agree)."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], check_files: bool = True) -> RunConfig:
        """Build from a kebab-case run-config; unknown or missing keys are errors.

        Types, ranges and choices are always checked. `check_files` also checks the files
        the ServerApp reads (`check_server_files`): right where the server runs, wrong on a
        SuperNode (which reads its own files, see `NodeRun`) or on a workstation that only
        submits the run.
        """
        values = with_current_names(values)
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(values) - set(by_key))
        if unknown:
            raise ConfigError(f"unknown run-config key(s): {', '.join(unknown)}")
        missing = sorted(set(by_key) - set(values))
        if missing:
            raise ConfigError(f"missing run-config key(s): {', '.join(missing)}")
        kwargs = {f.name: _coerce(key, values[key], f.type) for key, f in by_key.items()}
        config = cls(**kwargs)
        config.validate()
        if check_files:
            config.check_server_files()
        return config

    def to_dict(self) -> dict[str, Any]:
        """The resolved config with its run-config (kebab-case) key names."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    @property
    def uses_lora(self) -> bool:
        """LoRA schemes ship only the PEFT state (adapter + classifier head)."""
        return self.scheme != "fedavg"

    @property
    def uses_teacher(self) -> bool:
        """Only FedKDLoRA has a server-side teacher."""
        return self.scheme == "fedkdlora"

    @property
    def client_learning_rate(self) -> float:
        """Full fine-tuning and LoRA need learning rates an order of magnitude apart."""
        return self.lora_client_lr if self.uses_lora else self.client_lr

    @property
    def partial_participation(self) -> bool:
        """A round samples some of the nodes (`sampling.py` then makes the sample follow the seed)."""
        return self.fraction_train < 1 or self.fraction_evaluate < 1

    @property
    def uses_dp(self) -> bool:
        """Central DP is on when there is noise to add."""
        return self.dp_noise_multiplier > 0

    @property
    def ranks_by_partition(self) -> tuple[int, ...]:
        """`lora-r-by-partition` parsed; empty when every client uses `lora-r`."""
        try:
            return tuple(int(part) for part in self.lora_r_by_partition.split(",") if part.strip())
        except ValueError:
            raise ConfigError(
                f"run-config key 'lora-r-by-partition' = '{self.lora_r_by_partition}': "
                "give comma-separated integers, e.g. '4,8'"
            ) from None

    def client_rank(self, partition_id: int, node_config: Mapping[str, Any]) -> int:
        """A client's LoRA rank: node config `lora-r`, else `lora-r-by-partition`, else `lora-r`.

        Under naive averaging a rank other than the global one is refused here, on the
        client, rather than averaged wrongly.
        """
        ranks = self.ranks_by_partition
        rank = ranks[partition_id % len(ranks)] if ranks else self.lora_r
        where = f"run-config key 'lora-r-by-partition' = '{self.lora_r_by_partition}'"
        if "lora-r" in node_config:
            rank, where = int(node_config["lora-r"]), f"node config 'lora-r' = {node_config['lora-r']}"
        if rank != self.lora_r and self.lora_aggregation != "svd":
            raise ConfigError(
                f"{where}: rank {rank} differs from run-config 'lora-r' = {self.lora_r}; heterogeneous "
                "ranks need lora-aggregation = 'svd' (averaging A and B of different ranks is undefined)"
            )
        if not 1 <= rank <= self.lora_r:
            raise ConfigError(f"{where}: rank {rank} must be in 1..lora-r ({self.lora_r}), the global rank")
        return rank

    @property
    def num_labels(self) -> int:
        """CoLA and SST-2 are both binary."""
        return 2

    def validate(self) -> None:
        """Reject values no run can use, naming the key, the value and what is allowed."""
        _check_choice("scheme", self.scheme, SCHEMES)
        _check_choice("task", self.task, TASKS)
        _check_choice("partitioning", self.partitioning, PARTITIONINGS)
        _check_choice("lora-aggregation", self.lora_aggregation, LORA_AGGREGATIONS)
        _check_choice("wire-dtype", self.wire_dtype, WIRE_DTYPES)
        _check_choice("dp-clipping", self.dp_clipping, DP_CLIPPINGS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("server-student-signal", self.server_student_signal, SERVER_STUDENT_SIGNALS)
        _check_choice("kd-loss", self.kd_loss, KD_LOSSES)
        _check_choice("tracking", self.tracking, TRACKINGS)
        for key, value, low in (
            ("num-server-rounds", self.num_server_rounds, 1),
            ("lora-r", self.lora_r, 1),
            ("lora-alpha", self.lora_alpha, 1),
            ("batch-size", self.batch_size, 1),
            ("max-seq-length", self.max_seq_length, 8),
            ("min-available-nodes", self.min_available_nodes, 1),
            ("local-epochs", self.local_epochs, 0),
            ("student-layers", self.student_layers, 0),
            ("max-train-examples-per-client", self.max_train_examples_per_client, 0),
            ("max-eval-examples", self.max_eval_examples, 0),
            ("teacher-pretrain-epochs", self.teacher_pretrain_epochs, 0),
            ("teacher-epochs", self.teacher_epochs, 0),
            ("kd-epochs", self.kd_epochs, 0),
            ("max-public-examples", self.max_public_examples, 0),
        ):
            if value < low:
                raise ConfigError(f"run-config key '{key}' = {value}: must be >= {low}")
        for key, value in (
            ("client-lr", self.client_lr),
            ("lora-client-lr", self.lora_client_lr),
            ("teacher-pretrain-lr", self.teacher_pretrain_lr),
            ("distill-teacher-lr", self.distill_teacher_lr),
            ("distill-student-lr", self.distill_student_lr),
            ("kd-temperature", self.kd_temperature),
            ("dp-clipping-norm", self.dp_clipping_norm),
        ):
            if value <= 0:
                raise ConfigError(f"run-config key '{key}' = {value}: must be > 0")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"run-config key 'lora-dropout' = {self.lora_dropout}: must be in [0, 1)")
        if not 0 <= self.teacher_data_pct < 100:
            raise ConfigError(
                f"run-config key 'teacher-data-pct' = {self.teacher_data_pct}: must be in [0, 100)"
            )
        for key, value in (
            ("fraction-train", self.fraction_train),
            ("fraction-evaluate", self.fraction_evaluate),
        ):
            if not 0 < value <= 1:
                raise ConfigError(f"run-config key '{key}' = {value}: must be in (0, 1]")
        if not 0 < self.public_labelled_pct <= 100:
            raise ConfigError(
                f"run-config key 'public-labelled-pct' = {self.public_labelled_pct}: must be in (0, 100]"
            )
        if self.kd_loss == "original" and self.server_student_signal != "labels+teacher":
            raise ConfigError(
                f"run-config key 'kd-loss' = 'original': reproduces the original loss as a whole, which has "
                f"no control variants; use server-student-signal = 'labels+teacher', not "
                f"'{self.server_student_signal}'"
            )
        if self.centralized_public and self.teacher_data_pct == 0:
            raise ConfigError(
                "run-config key 'centralized-public' = true: needs a public slice (teacher-data-pct > 0)"
            )
        self._validate_lora_options()
        if self.kd_alpha < 0:
            raise ConfigError(f"run-config key 'kd-alpha' = {self.kd_alpha}: must be >= 0")
        if self.uses_teacher and self.teacher_data_pct == 0:
            raise ConfigError(
                "run-config key 'teacher-data-pct' = 0.0: "
                "fedkdlora needs a public slice (> 0) for its teacher"
            )
        if self.client_kd and not self.uses_teacher:
            raise ConfigError(
                f"run-config key 'client-kd' = true: needs scheme 'fedkdlora', not '{self.scheme}'"
            )
        if self.dirichlet_alpha <= 0:
            raise ConfigError(f"run-config key 'dirichlet-alpha' = {self.dirichlet_alpha}: must be > 0")
        if self.round_timeout <= 0:
            raise ConfigError(f"run-config key 'round-timeout' = {self.round_timeout}: must be > 0 (seconds)")
        if self.progress_interval < 0:
            raise ConfigError(
                f"run-config key 'progress-interval' = {self.progress_interval}: "
                "must be >= 0 (seconds; 0 = off)"
            )

    def _validate_lora_options(self) -> None:
        """LoRA aggregation, FFA-LoRA, heterogeneous ranks and DP: the combinations that make sense."""
        if self.dp_noise_multiplier < 0:
            raise ConfigError(
                f"run-config key 'dp-noise-multiplier' = {self.dp_noise_multiplier}: must be >= 0"
            )
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"run-config key 'dp-delta' = {self.dp_delta}: must be in (0, 1)")
        if self.dp_target_epsilon < 0:
            raise ConfigError(
                f"run-config key 'dp-target-epsilon' = {self.dp_target_epsilon}: must be >= 0 (0 = no limit)"
            )
        for key, value, default in (
            ("lora-aggregation", self.lora_aggregation, "naive"),
            ("lora-residual-rank", self.lora_residual_rank, 0),
            ("lora-freeze-a", self.lora_freeze_a, False),
            ("lora-r-by-partition", self.lora_r_by_partition, ""),
        ):
            if value != default and not self.uses_lora:
                raise ConfigError(f"run-config key '{key}' = {value!r}: needs a LoRA scheme, not 'fedavg'")
        ranks = self.ranks_by_partition
        if ranks and self.lora_aggregation != "svd" and set(ranks) != {self.lora_r}:
            raise ConfigError(
                f"run-config key 'lora-r-by-partition' = '{self.lora_r_by_partition}': heterogeneous ranks "
                "need lora-aggregation = 'svd' (averaging A and B of different ranks is undefined)"
            )
        if any(not 1 <= rank <= self.lora_r for rank in ranks):
            raise ConfigError(
                f"run-config key 'lora-r-by-partition' = '{self.lora_r_by_partition}': every rank must be "
                f"in 1..lora-r ({self.lora_r}), the global rank the server keeps"
            )
        if self.lora_freeze_a and self.lora_aggregation != "naive":
            raise ConfigError(
                f"run-config key 'lora-freeze-a' = true: incompatible with lora-aggregation = "
                f"'{self.lora_aggregation}'; with A frozen, naive averaging is already exact"
            )
        if self.lora_residual_rank < 0:
            raise ConfigError(
                f"run-config key 'lora-residual-rank' = {self.lora_residual_rank}: must be >= 0 (0 = dense)"
            )
        if self.lora_residual_rank and self.lora_aggregation != "exact":
            raise ConfigError(
                f"run-config key 'lora-residual-rank' = {self.lora_residual_rank}: needs lora-aggregation = "
                "'exact', the only variant that ships a residual"
            )
        if self.uses_dp and self.lora_aggregation != "naive":
            raise ConfigError(
                "run-config key 'dp-noise-multiplier' > 0: Flower's DP wrappers clip and noise the shipped "
                "factors, which needs lora-aggregation = 'naive'"
            )
        if self.uses_dp and self.wire_dtype == "bfloat16":
            raise ConfigError(
                "run-config key 'wire-dtype' = 'bfloat16': Flower's DP clipping works on numpy arrays, "
                "which have no bfloat16; use float16 or float32 with DP"
            )
        if self.uses_dp and self.dp_clipping == "client" and self.client_kd:
            raise ConfigError(
                "run-config key 'dp-clipping' = 'client': Flower's fixedclipping_mod accepts one ArrayRecord "
                "per message, and client-kd ships the teacher beside the model; use dp-clipping = 'server'"
            )

    def check_server_files(self) -> None:
        """The files the ServerApp reads, on its host: data, student and teacher models, the run to resume."""
        check_data_dir(self.data_dir, self.task, "run-config key 'data-dir'")
        check_model_folder(self.student_model, "run-config key 'student-model'")
        check_model_folder(self.teacher_base_model, "run-config key 'teacher-base-model'")
        if self.teacher_model and not (Path(self.teacher_model) / "config.json").is_file():
            raise ConfigError(
                f"run-config key 'teacher-model' = '{self.teacher_model}': no model directory "
                "(config.json) there; give a folder written by fedkdlora-pretrain-teacher, or '' to pre-train"
            )
        if self.resume_from:
            checkpoint = run_dir_of(Path(self.resume_from)) / CHECKPOINT_FILE
            if not (Path(self.resume_from).is_file() and checkpoint.is_file()):
                raise ConfigError(
                    f"run-config key 'resume-from' = '{self.resume_from}': give the results JSON of a run "
                    f"whose folder holds a checkpoint ({checkpoint} not found)"
                )


@dataclass(frozen=True)
class NodeRun:
    """The run as one SuperNode runs it: the run-config with this node's own settings applied.

    A SuperNode's `--node-config` gives its partition and, on a host of its own, where
    its files are: `data-dir` (a GLUE copy or its exported partition), `student-model`
    (a local copy of the student's base), `teacher-path` (a local client-KD teacher),
    `cache-dir` (where a shipped client-KD teacher is kept) and `lora-r`. They override
    the run-config, whose paths name the server's files; only then are the files this
    node reads checked, naming the key to fix.
    """

    config: RunConfig
    partition_id: int
    num_partitions: int
    teacher_path: str = ""
    cache_dir: str = ""

    @classmethod
    def from_node_config(cls, config: RunConfig, node_config: Mapping[str, Any]) -> NodeRun:
        try:
            partition_id = int(node_config["partition-id"])
            num_partitions = int(node_config["num-partitions"])
        except KeyError as error:
            raise ConfigError(
                f"node config lacks {error}: start the SuperNode with --node-config "
                "'partition-id=<i> num-partitions=<n>'"
            ) from None
        overrides = {
            field: str(node_config[key])
            for key, field in (("data-dir", "data_dir"), ("student-model", "student_model"))
            if key in node_config
        }
        config = dataclasses.replace(config, **overrides)
        if config.uses_lora:
            config = dataclasses.replace(config, lora_r=config.client_rank(partition_id, node_config))
        node = cls(
            config,
            partition_id,
            num_partitions,
            str(node_config.get("teacher-path", "")),
            str(node_config.get("cache-dir", "")),
        )
        node.check_files(node_config)
        return node

    def check_files(self, node_config: Mapping[str, Any]) -> None:
        """What this node reads: its data, the student's base and, for client KD, a local teacher."""
        config = self.config
        for key, value in (("data-dir", config.data_dir), ("student-model", config.student_model)):
            what, where = f"node config '{key}'", ""
            if key not in node_config:
                what = f"run-config key '{key}'"
                where = f" on this SuperNode (give it its own with node config '{key}')"
            if key == "data-dir":
                check_data_dir(value, config.task, what, where)
            else:
                check_model_folder(value, what, where)
        if config.client_kd and self.teacher_path and not (Path(self.teacher_path) / "config.json").is_file():
            raise ConfigError(
                f"node config 'teacher-path' = '{self.teacher_path}': no model directory (config.json) there"
            )


def check_data_dir(data_dir: str, task: str, what: str, where: str = "") -> None:
    """`data_dir` ("" = the hub) holds `<task>/train.tsv` and `dev.tsv`; `what` names the key in the error."""
    if not data_dir:
        return
    for split in ("train", "dev"):
        path = Path(data_dir) / task / f"{split}.tsv"
        if not path.is_file():
            raise ConfigError(f"{what} = '{data_dir}': no file {path}{where}")


def check_model_folder(name: str, what: str, where: str = "") -> None:
    """A local model folder must exist; hub ids ("org/name") and "" (embedded) are not files."""
    if _looks_like_path(name) and not Path(name).expanduser().exists():
        raise ConfigError(f"{what} = '{name}': no such local model folder{where}")


def _looks_like_path(value: str) -> bool:
    """Hub ids look like `name` or `org/name`; local folders are written with a leading / . or ~."""
    return value.startswith(("/", ".", "~"))


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"run-config key '{key}' = '{value}': allowed: {', '.join(allowed)}")


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    """TOML gives ints for `1` and floats for `1.0`; accept ints where floats are due."""
    expected = {"int": int, "float": float, "str": str, "bool": bool}[str(type_name)]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(
            f"run-config key '{key}' = {value!r}: expected {expected.__name__}, got {type(value).__name__}"
        )
    return value

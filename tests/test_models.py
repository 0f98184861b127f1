"""Student derivation, LoRA shipped state and saving, on the real embedded MiniLM."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord
from peft import PeftConfig, PeftModel
from transformers import AutoModelForSequenceClassification

from fedkdlora_app.models import (
    ModelError,
    build_student,
    load_classifier,
    load_saved_student,
    load_shipped_state,
    load_tokenizer,
    save_student,
    shipped_state,
    strided_layer_indices,
)
from tests.helpers import make_config


def test_strided_layer_indices() -> None:
    assert strided_layer_indices(6, 3) == [0, 2, 4]
    assert strided_layer_indices(12, 6) == [0, 2, 4, 6, 8, 10]
    assert strided_layer_indices(6, 6) == list(range(6))
    with pytest.raises(ModelError, match="student-layers"):
        strided_layer_indices(6, 7)


def test_student_keeps_the_chosen_layers_weights_exactly() -> None:
    base = load_classifier("", 2).state_dict()
    student = load_classifier("", 2, num_layers=3)
    assert student.config.num_hidden_layers == 3 and len(student.bert.encoder.layer) == 3
    state = student.state_dict()
    for student_layer, base_layer in enumerate([0, 2, 4]):
        prefix = f"bert.encoder.layer.{student_layer}."
        keys = [k for k in state if k.startswith(prefix)]
        assert len(keys) == 16
        for key in keys:
            torch.testing.assert_close(
                state[key], base[key.replace(prefix, f"bert.encoder.layer.{base_layer}.")], rtol=0, atol=0
            )
    for key in (k for k in state if k.startswith("bert.embeddings") or k.startswith("bert.pooler")):
        assert torch.equal(state[key], base[key])
    assert not any(k.startswith("bert.encoder.layer.3.") for k in state)


def test_lora_state_holds_only_adapter_and_head() -> None:
    config = make_config(scheme="fedlora")
    state = shipped_state(build_student(config), config)
    assert all("lora_A" in k or "lora_B" in k or ".classifier." in k for k in state), sorted(state)
    lora_keys = [k for k in state if "lora_" in k]
    assert len(lora_keys) == 3 * 2 * 2  # 3 layers x (query, value) x (A, B)
    assert all(".query." in k or ".value." in k for k in lora_keys)
    r, hidden = config.lora_r, 384
    assert sum(t.numel() for t in state.values()) == 3 * 2 * r * 2 * hidden + hidden * 2 + 2


def test_fedavg_ships_every_weight() -> None:
    config = make_config(scheme="fedavg")
    model = build_student(config)
    assert set(shipped_state(model, config)) == set(model.state_dict())


@pytest.mark.parametrize("scheme", ["fedavg", "fedlora"])
def test_shipped_state_round_trips_bit_exact(scheme: str) -> None:
    config = make_config(scheme=scheme)
    torch.manual_seed(1)
    source = build_student(config)
    with torch.no_grad():  # make the LoRA B matrices non-zero so the adapter matters
        for name, param in source.named_parameters():
            if "lora_B" in name:
                param.normal_()
    torch.manual_seed(2)
    target = build_student(config)
    record = ArrayRecord(shipped_state(source, config))
    load_shipped_state(target, record.to_torch_state_dict(), config)
    sent, received = shipped_state(source, config), shipped_state(target, config)
    assert sent.keys() == received.keys()
    for key in sent:
        assert torch.equal(sent[key], received[key]), key
    batch = load_tokenizer("")(["a fine film", "dull and long"], return_tensors="pt", padding=True)
    source.eval(), target.eval()
    assert torch.equal(source(**batch).logits, target(**batch).logits)


def test_mismatched_lora_state_is_refused() -> None:
    config = make_config(scheme="fedlora")
    state = shipped_state(build_student(config), config)
    state.pop(next(iter(state)))
    with pytest.raises(ModelError, match="missing"):
        load_shipped_state(build_student(config), state, config)


@pytest.mark.parametrize("scheme", ["fedavg", "fedlora"])
def test_saved_student_loads_like_a_user_would(scheme: str, tmp_path) -> None:
    config = make_config(scheme=scheme, **{"results-dir": str(tmp_path)})
    model = build_student(config).eval()
    batch = load_tokenizer("")(["a fine film", "dull and long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        untrained = model(**batch).logits
        # as if trained: LoRA's B off zero (at zero the adapter is a no-op, so a lost one looks
        # loaded), or every FedAvg weight moved off the embedded model's
        torch.manual_seed(3)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
            elif scheme == "fedavg":
                param.add_(torch.randn_like(param), alpha=0.01)
        trained = model(**batch).logits
    assert not torch.allclose(trained, untrained, atol=1e-3)
    out = save_student(model, config, tmp_path / "run" / "student")

    if scheme == "fedlora":  # the README's recipe
        base_path = PeftConfig.from_pretrained(out).base_model_name_or_path
        base = AutoModelForSequenceClassification.from_pretrained(base_path).eval()
        with torch.no_grad():
            without_adapter = base(**batch).logits
        loaded = PeftModel.from_pretrained(base, out)
        assert not torch.allclose(without_adapter, trained, atol=1e-3)
    else:
        loaded = AutoModelForSequenceClassification.from_pretrained(out)
    for user_model in (loaded, load_saved_student(out)):  # and the app's own loader
        user_model.eval()
        with torch.no_grad():
            torch.testing.assert_close(user_model(**batch).logits, trained, rtol=0, atol=1e-6)


def test_same_seed_same_initial_student() -> None:
    """Every party builds the same student from the run's seed, whatever its RNG state."""
    config = make_config(scheme="fedlora")
    states = []
    for rng_state in (0, 1):
        torch.manual_seed(rng_state)
        states.append(shipped_state(build_student(config), config))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other = shipped_state(build_student(make_config(scheme="fedlora", seed=config.seed + 1)), config)
    assert any(not torch.equal(states[0][k], other[k]) for k in other)


@pytest.mark.parametrize("scheme", ["fedavg", "fedlora"])
def test_the_shipped_state_is_a_snapshot_the_model_cannot_change(scheme: str) -> None:
    """A cached client model trains on after handing out its state; what was handed out must stay."""
    config = make_config(scheme=scheme)
    model = build_student(config)
    state = shipped_state(model, config)
    before = {key: tensor.clone() for key, tensor in state.items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    assert all(torch.equal(state[key], before[key]) for key in state)

"""The LoRA options end to end: real `flwr run` simulations with 2 SuperNodes, on the tiny BERT
(the tests are about what travels and how it is aggregated, not about the default model)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord

from fedkdlora_app.bookkeeping import payload_bytes
from fedkdlora_app.data import eval_split, loader_for
from fedkdlora_app.models import build_student, load_saved_student, shipped_state
from fedkdlora_app.training import evaluate
from fedkdlora_app.wire import to_wire
from tests.helpers import QUICK, ROUNDS, make_config, simulate, tiny_models


def lora_a(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The lora_A factors, by their place in the model (saved and live key names differ)."""
    return {
        k.split(".lora_A")[0].removeprefix("base_model.model."): v for k, v in state.items() if ".lora_A" in k
    }


def test_frozen_a_with_client_side_dp_stays_bit_identical_halves_the_uplink_and_bounds_the_move(
    tmp_path,
) -> None:
    """FFA-LoRA and client-side DP clipping in one run: each claim holds with the other on."""
    clipping = 1e-3
    dp = {"dp-noise-multiplier": 1e-6, "dp-clipping-norm": clipping, "dp-clipping": "client"}
    code, results = simulate(tmp_path, scheme="fedlora", **{"lora-freeze-a": True, **dp, **tiny_models()})
    assert code == 0, results and results["run"]["error"]
    lora = make_config(**{**QUICK, "scheme": "fedlora", "lora-freeze-a": True, **tiny_models()})
    initial = build_student(lora)
    full = shipped_state(initial, lora)
    # what travels: the head and B alone (A stays at its seeded init), sized apart from the run
    expected = payload_bytes(ArrayRecord({k: v for k, v in full.items() if ".lora_A" not in k}))
    all_factors = make_config(**{**QUICK, "scheme": "fedlora", **tiny_models()})
    with_a = payload_bytes(ArrayRecord(shipped_state(build_student(all_factors), all_factors)))
    head = payload_bytes(ArrayRecord({k: v for k, v in full.items() if ".lora_" not in k}))
    assert expected - head == (with_a - head) // 2  # half the LoRA uplink
    for entry in results["rounds"][1:]:
        per_node = entry["communication"]["per_node"]
        assert [node["up_bytes"] for node in per_node.values()] == [expected, expected]
    final = load_saved_student(Path(results["artifacts"]["student"]))
    final_a, initial_a = lora_a(final.state_dict()), lora_a(initial.state_dict())
    assert final_a.keys() == initial_a.keys() and final_a
    assert all(torch.equal(final_a[k], initial_a[k]) for k in initial_a)  # after every round
    trained_b = [v for k, v in final.state_dict().items() if ".lora_B" in k]
    assert all(b.any() for b in trained_b)  # B did train (it starts at zero)
    # client-side clipping: each round's mean of clipped updates has norm <= clipping (noise ~1e-7)
    privacy = results["model"]["privacy"]
    assert privacy["mechanism"].endswith("ClientSideFixedClipping") and privacy["sampled_clients"] == 2
    final_state = shipped_state(final, lora)
    moved = math.sqrt(sum(float((final_state[k] - full[k]).pow(2).sum()) for k in full))
    assert 0 < moved <= ROUNDS * clipping * 1.001, moved


@pytest.mark.slow  # the fast tier has svd's maths and rank fitting in test_lora_aggregation.py
def test_heterogeneous_ranks_with_svd_over_a_float16_wire(tmp_path) -> None:
    code, results = simulate(
        tmp_path,
        scheme="fedlora",
        **{"lora-aggregation": "svd", "lora-r-by-partition": "4,8", "wire-dtype": "float16", **tiny_models()},
    )
    assert code == 0, results and results["run"]["error"]
    by_rank = {}
    for rank in (4, 8):
        config = make_config(**{**QUICK, "scheme": "fedlora", "lora-r": rank, **tiny_models()})
        by_rank[rank] = payload_bytes(to_wire(shipped_state(build_student(config), config), "float16"))
    assert results["model"]["shipped_bytes_per_message"] == by_rank[8]  # the global rank, in float16
    for entry in results["rounds"][1:]:
        report = entry["aggregation"]
        assert report["method"] == "svd" and report["rank"] == 8 and report["client_ranks"] == [4, 8]
        assert 0 < report["truncation_error"] <= report["max_module_truncation_error"] < 1
        nodes = sorted(entry["communication"]["per_node"].values(), key=lambda node: node["up_bytes"])
        assert [node["up_bytes"] for node in nodes] == [by_rank[4], by_rank[8]]
        # the server learns a node's rank from its first update and then ships at that rank:
        # round 1 trains from the global rank, evaluation and later rounds get rank 4
        first_down = by_rank[8] if entry["round"] == 1 else by_rank[4]
        assert nodes[0]["down_bytes"] == first_down + by_rank[4]
        assert nodes[1]["down_bytes"] == 2 * by_rank[8]
        assert entry["failures"] == []
        server = entry["server"]["student"]
        assert all(math.isfinite(server[k]) for k in ("loss", "accuracy", "mcc"))


@pytest.mark.slow  # the fast tier proves alternating exact in test_lora_aggregation.py
def test_alternating_ships_one_factor_each_round_and_aggregates_exactly(tmp_path) -> None:
    """B and the head travel up in round 1, A and the head in round 2: each half the LoRA uplink;
    the full state travels down; the aggregate is the exact mean (error at float rounding)."""
    code, results = simulate(
        tmp_path, scheme="fedlora", **{"lora-aggregation": "alternating", **tiny_models()}
    )
    assert code == 0, results and results["run"]["error"]
    config = make_config(**{**QUICK, "scheme": "fedlora", **tiny_models()})
    initial = build_student(config)
    full = shipped_state(initial, config)
    without = {
        factor: payload_bytes(ArrayRecord({k: v for k, v in full.items() if factor not in k}))
        for factor in (".lora_A.", ".lora_B.")
    }
    head = payload_bytes(ArrayRecord({k: v for k, v in full.items() if ".lora_" not in k}))
    assert without[".lora_A."] - head == (payload_bytes(ArrayRecord(full)) - head) // 2
    for entry in results["rounds"][1:]:
        shipped = without[".lora_A."] if entry["round"] == 1 else without[".lora_B."]  # B, then A
        per_node = entry["communication"]["per_node"].values()
        assert [node["up_bytes"] for node in per_node] == [shipped, shipped]
        assert [node["down_bytes"] for node in per_node] == [2 * payload_bytes(ArrayRecord(full))] * 2
        assert entry["aggregation"]["method"] == "alternating" and entry["aggregation"]["error"] < 1e-5
        assert entry["failures"] == []
    final = load_saved_student(Path(results["artifacts"]["student"]))
    final_a, initial_a = lora_a(final.state_dict()), lora_a(initial.state_dict())
    assert all(not torch.equal(final_a[k], initial_a[k]) for k in initial_a)  # A trained in round 2
    assert all(v.any() for k, v in final.state_dict().items() if ".lora_B" in k)  # B in round 1


def test_exact_ships_the_residual_down_and_its_saved_adapter_loads_with_the_folded_base(tmp_path) -> None:
    """The dense residual travels down with every message (counted), never up; the aggregate is
    exact; the saved adapter, with the base it names (pre-trained weights + residual), loads in plain
    PEFT and reproduces the server's final metrics."""
    # one round: its aggregate already carries a residual, which the saved base must hold
    overrides = {
        **QUICK,
        "scheme": "fedlora",
        "lora-aggregation": "exact",
        "num-server-rounds": 1,
        **tiny_models(),
    }
    code, results = simulate(tmp_path, **overrides)
    assert code == 0, results and results["run"]["error"]
    config = make_config(**overrides)
    full = shipped_state(build_student(config), config)
    residual = {k: v for k, v in full.items() if ".residual." in k}
    adapted = [k for k in full if ".lora_B." in k]
    assert len(residual) == len(adapted) > 0
    down = payload_bytes(ArrayRecord(full))
    up = payload_bytes(ArrayRecord({k: v for k, v in full.items() if k not in residual}))
    assert results["model"]["shipped_bytes_per_message"] == down
    for entry in results["rounds"][1:]:
        per_node = entry["communication"]["per_node"].values()
        assert [(node["up_bytes"], node["down_bytes"]) for node in per_node] == [(up, 2 * down)] * 2
        report = entry["aggregation"]
        assert report["method"] == "exact" and report["error"] < 1e-5
        assert report["residual_elements"] == sum(v.numel() for v in residual.values())
    student_dir = Path(results["artifacts"]["student"])
    model = load_saved_student(student_dir)
    assert Path(model.peft_config["default"].base_model_name_or_path) == student_dir.with_name("student-base")
    metrics = evaluate(model, loader_for(eval_split(config), config), model.device).metrics()
    reported = results["rounds"][-1]["server"]["student"]
    assert metrics["accuracy"] == reported["accuracy"]
    assert metrics["loss"] == pytest.approx(reported["loss"], rel=1e-5)

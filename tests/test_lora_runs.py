"""The LoRA options end to end: real `flwr run` simulations with 2 SuperNodes."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from fedkdlora_app.bookkeeping import payload_bytes
from fedkdlora_app.models import build_student, load_saved_student, shipped_state
from fedkdlora_app.wire import to_wire
from tests.helpers import QUICK, ROUNDS, make_config, simulate


def lora_a(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The lora_A factors, by their place in the model (saved and live key names differ)."""
    return {
        k.split(".lora_A")[0].removeprefix("base_model.model."): v for k, v in state.items() if ".lora_A" in k
    }


def test_frozen_a_stays_bit_identical_and_halves_the_lora_uplink(tmp_path) -> None:
    code, results = simulate(tmp_path, scheme="fedlora", **{"lora-freeze-a": True})
    assert code == 0, results and results["run"]["error"]
    lora = make_config(**{**QUICK, "scheme": "fedlora"})
    initial = build_student(lora)
    full = shipped_state(initial, lora)
    head = payload_bytes(ArrayRecord({k: v for k, v in full.items() if ".lora_" not in k}))
    expected = (payload_bytes(ArrayRecord(full)) - head) // 2 + head
    for entry in results["rounds"][1:]:
        per_node = entry["communication"]["per_node"]
        assert [node["up_bytes"] for node in per_node.values()] == [expected, expected]
    final = load_saved_student(Path(results["artifacts"]["student"]))
    final_a, initial_a = lora_a(final.state_dict()), lora_a(initial.state_dict())
    assert final_a.keys() == initial_a.keys() and final_a
    assert all(torch.equal(final_a[k], initial_a[k]) for k in initial_a)  # after every round
    trained_b = [v for k, v in final.state_dict().items() if ".lora_B" in k]
    assert all(b.any() for b in trained_b)  # B did train (it starts at zero)


def test_heterogeneous_ranks_with_svd_over_a_float16_wire(tmp_path) -> None:
    code, results = simulate(
        tmp_path,
        scheme="fedlora",
        **{"lora-aggregation": "svd", "lora-r-by-partition": "4,8", "wire-dtype": "float16"},
    )
    assert code == 0, results and results["run"]["error"]
    by_rank = {}
    for rank in (4, 8):
        config = make_config(**{**QUICK, "scheme": "fedlora", "lora-r": rank})
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


def test_client_side_dp_clipping_bounds_how_far_the_global_model_moves(tmp_path) -> None:
    clipping = 1e-3
    code, results = simulate(
        tmp_path,
        scheme="fedlora",
        **{"dp-noise-multiplier": 1e-6, "dp-clipping-norm": clipping, "dp-clipping": "client"},
    )
    assert code == 0, results and results["run"]["error"]
    privacy = results["model"]["privacy"]
    assert privacy["mechanism"].endswith("ClientSideFixedClipping") and privacy["sampled_clients"] == 2
    config = make_config(**{**QUICK, "scheme": "fedlora"})
    initial = shipped_state(build_student(config), config)
    final = shipped_state(load_saved_student(Path(results["artifacts"]["student"])), config)
    moved = math.sqrt(sum(float((final[k] - initial[k]).pow(2).sum()) for k in initial))
    # each round's mean of clipped updates has norm <= clipping; the noise is ~1e-7 here
    assert 0 < moved <= ROUNDS * clipping * 1.001, moved

"""Partial participation: a seed fixes which clients each round samples, in every run of it.

Flower's simulated SuperNodes get random node ids in each run; the clients a round samples
must follow from the run's seed and the round, or two schemes compared on one seed train on
different clients (real `flwr run` simulations, 4 SuperNodes, the tiny BERT).
"""

from __future__ import annotations

from tests.helpers import simulate, tiny_models

NODES = 4
PARTIAL = {
    "scheme": "fedlora",
    "num-server-rounds": 2,
    "fraction-train": 0.5,
    "fraction-evaluate": 0.5,
    "min-available-nodes": NODES,
    **tiny_models(),
}


def _without_seconds(record: dict) -> dict:
    return {
        k: _without_seconds(v) if isinstance(v, dict) else v for k, v in record.items() if "seconds" not in k
    }


def test_half_the_clients_sampled_are_the_same_partitions_in_two_runs_of_one_seed(tmp_path) -> None:
    runs = []
    for name in ("first", "second"):
        code, results = simulate(tmp_path / name, f"num-supernodes={NODES}", **PARTIAL)
        assert code == 0, results and results["run"]["error"]
        runs.append(results)
    first, second = runs
    for a, b in zip(first["rounds"][1:], second["rounds"][1:], strict=True):
        for stage in ("train", "evaluate"):
            sampled = a["sampled_partitions"][stage]
            assert len(sampled) == NODES // 2 and set(sampled) <= set(range(NODES)), (a["round"], stage)
            assert sampled == b["sampled_partitions"][stage], (a["round"], stage)
        # what the sampled clients computed on their own data: the same clients, the same numbers
        assert _without_seconds(a["clients"]) == _without_seconds(b["clients"]), a["round"]
        assert a["server"] == b["server"], a["round"]

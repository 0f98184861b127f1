"""LoRA aggregation (naive, SVD, alternating, exact), rank fitting, wire dtypes, FFA-LoRA and DP,
against direct computation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedkdlora_app.aggregation import UpdateAggregator
from fedkdlora_app.bookkeeping import payload_bytes
from fedkdlora_app.config import ConfigError
from fedkdlora_app.lora import delta_weight, fit_rank, frozen_factor, lora_pairs, reply_keys
from fedkdlora_app.models import build_student, load_shipped_state, shipped_state, train_factors
from fedkdlora_app.privacy import TrackedServerSideClippingDP
from fedkdlora_app.results import RunRecorder
from fedkdlora_app.strategy import ServerStep, TrackedFedAvg
from fedkdlora_app.wire import from_wire, to_wire
from tests.helpers import make_config, train_reply

ALPHA = 16.0
MODULES = {"base_model.model.layer.0.query": (6, 5), "base_model.model.layer.0.value": (7, 4)}  # (out, in)


def client_state(rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA state (A, B per module, and a head) with known random factors."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out, inp) in MODULES.items():
        state[f"{name}.lora_A.weight"] = torch.randn(rank, inp, generator=generator)
        state[f"{name}.lora_B.weight"] = torch.randn(out, rank, generator=generator)
    state["base_model.model.classifier.weight"] = torch.randn(2, 5, generator=generator)
    return state


class _Linear(torch.nn.Module):
    def __init__(self, inp: int, out: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(inp, out, bias=False)


def peft_delta(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """What PEFT adds to a weight for LoRA factors A, B: its merged weight minus the base weight."""
    from peft import LoraConfig, get_peft_model

    rank, inp = a.shape
    model = get_peft_model(
        _Linear(inp, b.shape[0]),
        LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=["linear"]),
    )
    layer = model.base_model.model.linear
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    base = layer.base_layer.weight.detach().clone()
    return (model.merge_and_unload().linear.weight.detach() - base).double()


def deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each module's update as PEFT merges it: the reference, computed apart from the app's maths."""
    return {m: peft_delta(state[a], state[b], ALPHA) for m, (a, b) in lora_pairs(state).items()}


def test_the_apps_delta_weight_is_what_peft_merges() -> None:
    for rank, seed in ((2, 1), (4, 2)):
        state = client_state(rank, seed)
        for a, b in lora_pairs(state).values():
            torch.testing.assert_close(
                delta_weight(state[a], state[b], ALPHA),
                peft_delta(state[a], state[b], ALPHA),
                rtol=1e-5,
                atol=1e-5,
            )


def aggregate(method: str, rank: int, states, counts, wire_dtype: str = "float32"):
    aggregator = UpdateAggregator(method, wire_dtype, ALPHA, rank)
    replies = [
        train_reply(i + 1, to_wire(s, wire_dtype), n)
        for i, (s, n) in enumerate(zip(states, counts, strict=True))
    ]
    arrays, report = aggregator([r.content for r in replies], "arrays", "num_examples")
    return from_wire(arrays, wire_dtype), report


def weighted_mean_deltas(states, counts) -> dict[str, torch.Tensor]:
    total = sum(counts)
    per_client = [deltas(s) for s in states]
    return {m: sum(n / total * d[m] for d, n in zip(per_client, counts, strict=True)) for m in MODULES}


def test_svd_at_full_rank_is_the_exact_mean_of_the_updates_and_naive_is_not() -> None:
    states, counts = [client_state(2, 1), client_state(2, 2)], [30, 10]
    expected = weighted_mean_deltas(states, counts)
    svd, report = aggregate("svd", 4, states, counts)  # two rank-2 updates: rank <= 4
    for module, delta in deltas(svd).items():
        torch.testing.assert_close(delta, expected[module], rtol=1e-5, atol=1e-5)
    assert report["truncation_error"] == pytest.approx(0.0, abs=1e-6)
    naive, naive_report = aggregate("naive", 2, states, counts)
    for module, delta in deltas(naive).items():
        assert not torch.allclose(delta, expected[module], atol=1e-2), module
    # the reported error: how far the aggregate's update lies from the exact mean (from zero here)
    off = sum(float(torch.linalg.matrix_norm(deltas(naive)[m] - expected[m]) ** 2) for m in MODULES)
    moved = sum(float(torch.linalg.matrix_norm(expected[m]) ** 2) for m in MODULES)
    assert naive_report == {"method": "naive", "error": pytest.approx((off / moved) ** 0.5, rel=1e-4)}
    assert naive_report["error"] > 0.1 and report["error"] == pytest.approx(0.0, abs=1e-6)
    # the head is the plain weighted mean either way
    head = "base_model.model.classifier.weight"
    torch.testing.assert_close(svd[head], (30 * states[0][head] + 10 * states[1][head]) / 40)
    torch.testing.assert_close(naive[head], svd[head])


def test_truncation_error_matches_a_direct_computation() -> None:
    states, counts = [client_state(3, 3), client_state(3, 4)], [1, 1]
    expected = weighted_mean_deltas(states, counts)
    truncated, report = aggregate("svd", 2, states, counts)
    got = deltas(truncated)
    tail = sum(float(torch.linalg.matrix_norm(expected[m] - got[m]) ** 2) for m in MODULES)
    total = sum(float(torch.linalg.matrix_norm(expected[m]) ** 2) for m in MODULES)
    assert report["truncation_error"] == pytest.approx((tail / total) ** 0.5, rel=1e-4)
    per_module = [
        float(torch.linalg.matrix_norm(expected[m] - got[m]) / torch.linalg.matrix_norm(expected[m]))
        for m in MODULES
    ]
    assert report["max_module_truncation_error"] == pytest.approx(max(per_module), rel=1e-4)
    assert 0 < report["truncation_error"] < 1 and report["rank"] == 2 and report["client_ranks"] == [3]
    # Eckart-Young: no rank-2 factorisation is closer than the truncated SVD
    for module in MODULES:
        u, s, vh = torch.linalg.svd(expected[module])
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(got[module], best, rtol=1e-4, atol=1e-5)


def test_heterogeneous_ranks_aggregate_into_the_global_rank() -> None:
    states, counts = [client_state(2, 5), client_state(4, 6)], [10, 10]
    expected = weighted_mean_deltas(states, counts)  # rank <= 6 > 4: truncated
    result, report = aggregate("svd", 4, states, counts)
    assert report["client_ranks"] == [2, 4]
    for module, (a, b) in lora_pairs(result).items():
        assert result[a].shape == (4, MODULES[module][1])
        assert result[b].shape[1] == 4
    error = sum(float(torch.linalg.matrix_norm(expected[m] - d) ** 2) for m, d in deltas(result).items())
    total = sum(float(torch.linalg.matrix_norm(d) ** 2) for d in expected.values())
    assert report["truncation_error"] == pytest.approx((error / total) ** 0.5, rel=1e-4)


def test_fit_rank_gives_a_client_the_best_approximation_at_its_rank() -> None:
    global_state = client_state(4, 7)
    fitted = fit_rank(global_state, 2, ALPHA)
    for module, delta in deltas(global_state).items():
        a, b = lora_pairs(fitted)[module]
        assert fitted[a].shape[0] == 2 and fitted[b].shape[1] == 2
        u, s, vh = torch.linalg.svd(delta)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(delta_weight(fitted[a], fitted[b], ALPHA), best, rtol=1e-5, atol=1e-5)
    assert fit_rank(global_state, 4, ALPHA) == global_state  # its own rank: untouched
    fresh = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in global_state.items()}
    kept = fit_rank(fresh, 2, ALPHA)  # LoRA's init (B = 0): keep A's rows, so gradients can flow
    for a, b in lora_pairs(fresh).values():
        assert torch.equal(kept[a], fresh[a][:2]) and not kept[b].any()


def merged_weights(config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapted layers' weights of the model a shipped state defines, computed apart from the app:
    PEFT merges the factors into a fresh student, then the residual (if any) is added by hand."""
    from peft import set_peft_model_state_dict

    model = build_student(config)
    set_peft_model_state_dict(model, {k: v for k, v in state.items() if ".residual" not in k})
    merged = dict(model.merge_and_unload().named_parameters())
    weights = {}
    for key_a in (k for k in state if ".lora_A." in k):
        module = key_a.split(".lora_A.")[0]
        weight = merged[f"{module.removeprefix('base_model.model.')}.weight"].detach().double()
        if f"{module}.residual.weight" in state:
            weight = weight + state[f"{module}.residual.weight"].double()
        elif f"{module}.residual_A.weight" in state:
            weight = (
                weight
                + state[f"{module}.residual_B.weight"].double()
                @ state[f"{module}.residual_A.weight"].double()
            )
        weights[module] = weight
    return weights


def clients_of(config, sent: dict[str, torch.Tensor], server_round: int, count: int):
    """`count` clients' train replies to `sent`: the trainable factors and head moved at random, as a
    round of training would (the real student, the real freezing and reply)."""
    from fedkdlora_app.client_app import cached_student

    frozen = frozen_factor(config.lora_aggregation, config.lora_freeze_a, server_round)
    model = cached_student(config)
    replies, models = [], []
    for i in range(count):
        load_shipped_state(model, sent, config)
        train_factors(model, frozen)
        generator = torch.Generator().manual_seed(100 * server_round + i)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        state = shipped_state(model, config)
        models.append(state)
        replies.append({k: state[k] for k in reply_keys(state, frozen)})
    return replies, models


@pytest.mark.parametrize(("method", "exact"), [("alternating", True), ("exact", True), ("naive", False)])
def test_alternating_and_exact_make_the_global_model_the_mean_of_the_clients_models(method, exact) -> None:
    """Two rounds, 3 clients of unequal size: the global adapted weights (PEFT-merged, residual added)
    equal the example-weighted mean of the clients' to float tolerance; naive's do not (the control).
    Alternating ships B in odd rounds and A in even ones; exact ships no residual back."""
    config = make_config(scheme="fedlora", **{"lora-aggregation": method})
    aggregator = UpdateAggregator.from_config(config)
    counts = [10, 20, 30]
    sent = shipped_state(build_student(config), config)
    for server_round in (1, 2):
        replies, models = clients_of(config, sent, server_round, len(counts))
        template = aggregator.reply_template(to_wire(sent, "float32"), server_round)
        assert [set(reply) == set(template) for reply in replies] == [True] * 3
        if method == "alternating":
            factor = ".lora_B." if server_round % 2 else ".lora_A."
            other = ".lora_A." if server_round % 2 else ".lora_B."
            assert any(factor in k for k in template) and not any(other in k for k in template)
        if method == "exact":
            assert not any(".residual" in k for k in template) and any(".residual" in k for k in sent)
        contents = [
            train_reply(i + 1, to_wire(r, "float32"), n).content
            for i, (r, n) in enumerate(zip(replies, counts, strict=True))
        ]
        arrays, report = aggregator(contents, "arrays", "num_examples", to_wire(sent, "float32"))
        new = from_wire(arrays, "float32")
        assert list(new) == list(sent)  # the global state keeps its keys and their order
        got = merged_weights(config, new)
        per_client = [merged_weights(config, model) for model in models]
        mean = {m: sum(n / sum(counts) * w[m] for w, n in zip(per_client, counts, strict=True)) for m in got}
        close = [torch.allclose(got[m], mean[m], rtol=0, atol=1e-5) for m in got]
        assert all(close) if exact else not any(close), (server_round, close)
        assert report["method"] == method
        assert (report["error"] < 1e-5) if exact else (report["error"] > 1e-2), report
        sent = new


def test_the_folded_residual_is_what_the_client_and_server_models_compute_with() -> None:
    """`load_shipped_state` folds an exact run's residual into the frozen weights: merged by PEFT,
    the model equals the state's adapted weights computed apart; a later state replaces it."""
    config = make_config(scheme="fedlora", **{"lora-aggregation": "exact", "lora-residual-rank": 2})
    model = build_student(config)
    state = shipped_state(model, config)
    residual_keys = [k for k in state if ".residual_" in k]
    assert residual_keys and all(not state[k].any() for k in residual_keys)  # a fresh run: zero
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        state = {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in state.items()}
        load_shipped_state(model, state, config)
        assert shipped_state(model, config).keys() == state.keys()
        torch.testing.assert_close(shipped_state(model, config), state)  # the residual travels on
        expected = merged_weights(config, state)
        merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
        for module, weight in expected.items():
            torch.testing.assert_close(
                merged[f"{module.removeprefix('base_model.model.')}.weight"].double(),
                weight,
                rtol=0,
                atol=1e-5,
            )


@pytest.mark.parametrize(("wire_dtype", "precision"), [("float16", 2**-11), ("bfloat16", 2**-8)])
def test_half_precision_wire_halves_the_bytes_and_keeps_values(wire_dtype: str, precision: float) -> None:
    config = make_config(scheme="fedlora")
    state = shipped_state(build_student(config), config)
    full, half = to_wire(state, "float32"), to_wire(state, wire_dtype)
    params = sum(t.numel() for t in state.values())
    assert payload_bytes(full) - payload_bytes(half) == 2 * params  # 4 -> 2 bytes a value; same headers
    back = from_wire(half, wire_dtype)
    for key, tensor in state.items():
        assert back[key].dtype == torch.float32
        torch.testing.assert_close(back[key], tensor, rtol=precision, atol=1e-7)
    assert to_wire(back, wire_dtype) == half  # a second trip changes nothing


def test_frozen_a_is_never_trained_nor_shipped() -> None:
    lora, ffa = make_config(scheme="fedlora"), make_config(scheme="fedlora", **{"lora-freeze-a": True})
    model = build_student(ffa)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(".lora_A." in n for n in trainable)
    full, shipped = shipped_state(build_student(lora), lora), shipped_state(model, ffa)
    assert set(shipped) == {k for k in full if ".lora_A." not in k}
    head = payload_bytes(ArrayRecord({k: v for k, v in full.items() if ".lora_" not in k}))
    assert payload_bytes(ArrayRecord(shipped)) == (payload_bytes(ArrayRecord(full)) - head) / 2 + head


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora-r-by-partition": "4,8"}, "'lora-r-by-partition' = '4,8': heterogeneous ranks need"),
        ({"lora-aggregation": "svd", "lora-r-by-partition": "4,16"}, "every rank must be in 1..lora-r (8)"),
        ({"lora-r-by-partition": "4;8"}, "'lora-r-by-partition' = '4;8': give comma-separated integers"),
        ({"lora-aggregation": "svd", "lora-freeze-a": True}, "'lora-freeze-a' = true: incompatible"),
        ({"scheme": "fedavg", "lora-aggregation": "svd"}, "'lora-aggregation' = 'svd': needs a LoRA scheme"),
        (
            {"lora-aggregation": "mean"},
            "'lora-aggregation' = 'mean': allowed: naive, svd, alternating, exact",
        ),
        ({"lora-aggregation": "alternating", "lora-freeze-a": True}, "'lora-freeze-a' = true: incompatible"),
        ({"lora-aggregation": "exact", "lora-r-by-partition": "4,8"}, "heterogeneous ranks need"),
        ({"lora-residual-rank": 4}, "'lora-residual-rank' = 4: needs lora-aggregation = 'exact'"),
        ({"lora-aggregation": "exact", "lora-residual-rank": -1}, "'lora-residual-rank' = -1: must be >= 0"),
        ({"dp-noise-multiplier": 1.0, "lora-aggregation": "alternating"}, "needs lora-aggregation = 'naive'"),
        ({"wire-dtype": "int8"}, "'wire-dtype' = 'int8': allowed: float32, float16, bfloat16"),
        ({"dp-noise-multiplier": 1.0, "wire-dtype": "bfloat16"}, "'wire-dtype' = 'bfloat16'"),
        ({"dp-noise-multiplier": 1.0, "lora-aggregation": "svd"}, "needs lora-aggregation = 'naive'"),
        ({"dp-clipping-norm": 0.0}, "'dp-clipping-norm' = 0.0: must be > 0"),
    ],
)
def test_incompatible_lora_options_are_refused_naming_the_key(overrides, message) -> None:
    with pytest.raises(ConfigError, match="run-config key") as error:
        make_config(**{"scheme": "fedlora", **overrides})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_client_rank_that_naive_averaging_cannot_use_is_refused_on_the_client() -> None:
    naive, svd = make_config(scheme="fedlora"), make_config(scheme="fedlora", **{"lora-aggregation": "svd"})
    assert naive.client_rank(0, {}) == 8
    with pytest.raises(ConfigError, match="node config 'lora-r' = 4: rank 4 differs"):
        naive.client_rank(0, {"lora-r": 4})
    assert svd.client_rank(0, {"lora-r": 4}) == 4
    by_partition = make_config(scheme="fedlora", **{"lora-aggregation": "svd", "lora-r-by-partition": "4,8"})
    assert [by_partition.client_rank(p, {}) for p in range(4)] == [4, 8, 4, 8]
    with pytest.raises(ConfigError, match=r"rank 16 must be in 1\.\.lora-r"):
        svd.client_rank(0, {"lora-r": 16})


@pytest.fixture()
def recorder(tmp_path) -> RunRecorder:
    return RunRecorder(make_config(**{"results-dir": str(tmp_path)}))


def _server_side_dp(recorder: RunRecorder, noise: float, clipping: float) -> TrackedServerSideClippingDP:
    inner = TrackedFedAvg(recorder)
    dp = TrackedServerSideClippingDP(inner, noise, clipping, 2)
    dp.current_arrays = inner.screen.sent = ArrayRecord([np.zeros(4, dtype=np.float32)])
    return dp


def test_server_side_dp_clips_each_update_to_the_norm(recorder: RunRecorder) -> None:
    dp = _server_side_dp(recorder, noise=0.0, clipping=1.0)
    updates = [np.array([3.0, 4.0, 0, 0], dtype=np.float32), np.array([0, 0, 0.3, 0.4], dtype=np.float32)]
    arrays, _ = dp.aggregate_train(1, [train_reply(i + 1, [u], 10) for i, u in enumerate(updates)])
    # the first (norm 5) is scaled to norm 1, the second (norm 0.5) is kept; then the mean
    np.testing.assert_allclose(arrays["0"].numpy(), [0.3, 0.4, 0.15, 0.2], rtol=1e-6)
    noisy, _ = _server_side_dp(recorder, noise=1.0, clipping=1.0).aggregate_train(
        2, [train_reply(i + 1, [u], 10) for i, u in enumerate(updates)]
    )
    assert not np.allclose(noisy["0"].numpy(), [0.3, 0.4, 0.15, 0.2], atol=1e-3)


def test_a_failed_client_under_dp_skips_the_round_and_is_recorded(recorder: RunRecorder) -> None:
    seen = []
    dp = ServerStep(
        _server_side_dp(recorder, noise=1.0, clipping=1.0),
        lambda server_round, arrays: seen.append(server_round) or arrays,
    )
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    instruction = Message(RecordDict({}), dst_node_id=2, message_type="train")
    TaskIdentity.node_id = 2
    failed = Message(Error(code=0, reason="node lost"), reply_to=instruction)
    arrays, _ = dp.aggregate_train(1, [train_reply(1, [np.ones(4, dtype=np.float32)], 10), failed])
    assert arrays is None and seen == []  # Flower's DP wrapper releases nothing this round
    assert recorder.round(1)["failures"] == [{"stage": "train", "node_id": 2, "reason": "node lost"}]
    dp.aggregate_train(2, [train_reply(1, [np.ones(4, dtype=np.float32)], 10)] * 2)
    assert seen == [2]  # the scheme's step runs on the noised aggregate


def _lora_reply(node_id: int, ranks: dict[str, tuple[int, int]], count: int = 10) -> Message:
    """A train reply whose LoRA factors of each module have the given (A rank, B rank)."""
    state = client_state(4, node_id)
    for name, (out, inp) in MODULES.items():
        rank_a, rank_b = ranks.get(name, (4, 4))
        state[f"{name}.lora_A.weight"] = torch.ones(rank_a, inp)
        state[f"{name}.lora_B.weight"] = torch.ones(out, rank_b)
    return train_reply(node_id, to_wire(state, "float32"), count)


QUERY, VALUE = MODULES


@pytest.mark.parametrize("method", ["naive", "svd"])
@pytest.mark.parametrize(
    ("ranks", "problems"),
    [
        ({QUERY: (4, 6)}, {"naive": "differ in rank: lora_A 4, lora_B 6", "svd": "differ in rank"}),
        ({QUERY: (0, 0), VALUE: (0, 0)}, {"naive": "differs from the sent rank 4", "svd": "outside 1..4"}),
        ({QUERY: (8, 8), VALUE: (8, 8)}, {"naive": "differs from the sent rank 4", "svd": "outside 1..4"}),
        ({QUERY: (2, 2), VALUE: (2, 2)}, {"naive": "differs from the sent rank 4", "svd": None}),
        ({QUERY: (2, 2)}, {"naive": "differs from the sent rank 4", "svd": "several ranks [2, 4]"}),
    ],
)
def test_an_update_the_aggregation_cannot_use_is_dropped_not_fatal(recorder, method, ranks, problems) -> None:
    """One place decides what the aggregation can take; a bad reply never reaches it (issue: svd crashed)."""
    strategy = TrackedFedAvg(recorder, aggregator=UpdateAggregator(method, "float32", ALPHA, 4))
    strategy.screen.sent = to_wire(client_state(4, 0), "float32")
    good, bad = _lora_reply(1, {}, 30), _lora_reply(2, ranks, 10)
    arrays, metrics = strategy.aggregate_train(1, [good, bad])
    problem = problems[method]
    assert arrays is not None
    if problem is None:  # svd takes lower ranks: both updates are averaged
        assert metrics["num_examples"] == 40 and recorder.round(1)["failures"] == []
        return
    assert metrics["num_examples"] == 30  # the good update alone
    [failure] = recorder.round(1)["failures"]
    assert failure["node_id"] == 2 and failure["reason"].startswith("rejected update: ")
    assert problem in failure["reason"], failure["reason"]
    assert recorder.round(1)["aggregated_updates"] == 1


def test_a_factor_whose_other_dimension_differs_from_the_sent_one_is_dropped(recorder) -> None:
    strategy = TrackedFedAvg(recorder, aggregator=UpdateAggregator("svd", "float32", ALPHA, 4))
    strategy.screen.sent = to_wire(client_state(4, 0), "float32")
    bad = client_state(4, 2)
    bad[f"{QUERY}.lora_A.weight"] = torch.ones(4, 9)  # in-features 5 were sent
    arrays, metrics = strategy.aggregate_train(
        1, [_lora_reply(1, {}, 30), train_reply(2, to_wire(bad, "float32"), 10)]
    )
    assert arrays is not None and metrics["num_examples"] == 30
    assert "are [4, 9] and [6, 4], sent as [4, 5] and [6, 4]" in recorder.round(1)["failures"][0]["reason"]

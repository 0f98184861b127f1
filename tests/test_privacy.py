"""Central DP's privacy budget: ε per round from Flower's accountant, checked against values computed
apart, and a run that stops before the round that would exceed `dp-target-epsilon`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from scipy.optimize import brentq
from scipy.stats import norm

from fedkdlora_app.aggregation import UpdateAggregator
from fedkdlora_app.config import ConfigError
from fedkdlora_app.data import eval_split, loader_for
from fedkdlora_app.models import load_saved_student
from fedkdlora_app.privacy import PrivacyBudgetReached, PrivacyLedger, check_privacy_budget, epsilon_after
from fedkdlora_app.protocol import NUM_EXAMPLES_KEY
from fedkdlora_app.results import RunRecorder
from fedkdlora_app.training import evaluate
from tests.helpers import QUICK, make_config, simulate, tiny_models

DELTA = 1e-5


def exact_epsilon(releases: int, noise_multiplier: float, delta: float) -> float:
    """The exact ε of `releases` composed Gaussian mechanisms: together one Gaussian mechanism with
    mu = sqrt(releases) / noise multiplier (Dong, Roth and Su's Gaussian DP), whose δ(ε) is Balle
    and Wang's analytic formula. Every valid accountant reports at least this."""
    mu = math.sqrt(releases) / noise_multiplier

    def delta_at(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(delta_at, 0.0, 300.0)


def classic_rdp_epsilon(releases: int, noise_multiplier: float, delta: float) -> float:
    """Mironov's RDP bound, optimised over the order in closed form: what RDP accounting must not exceed."""
    sigma = noise_multiplier
    return releases / (2 * sigma**2) + math.sqrt(2 * releases * math.log(1 / delta)) / sigma


@pytest.mark.parametrize("noise_multiplier", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("releases", [1, 2, 5, 20])
def test_epsilon_lies_between_the_exact_value_and_the_classic_rdp_bound(releases, noise_multiplier) -> None:
    eps = epsilon_after(releases, noise_multiplier, DELTA)
    exact = exact_epsilon(releases, noise_multiplier, DELTA)
    assert exact <= eps <= classic_rdp_epsilon(releases, noise_multiplier, DELTA)
    assert eps <= 1.1 * exact  # RDP is within 10 % of the exact value here


def test_the_ledger_stops_before_the_release_that_would_exceed_the_target() -> None:
    config = make_config(**{"dp-noise-multiplier": 1.0, "dp-target-epsilon": 7.5, "dp-delta": DELTA})
    ledger = PrivacyLedger(config)
    for server_round in (1, 2):  # ε after two releases: 7.08
        ledger.check_next(server_round)
        ledger.released()
    assert ledger.epsilon == pytest.approx(epsilon_after(2, 1.0, DELTA))
    with pytest.raises(PrivacyBudgetReached, match=r"'dp-target-epsilon' = 7.5: round 3 would reach ε 9"):
        ledger.check_next(3)
    resumed = PrivacyLedger(config, releases=2)  # a resumed run recounts the releases it keeps
    assert resumed.epsilon == ledger.epsilon


def test_a_budget_too_small_for_one_round_is_refused_before_training() -> None:
    config = make_config(**{"dp-noise-multiplier": 1.0, "dp-target-epsilon": 1.0})
    with pytest.raises(ConfigError, match=r"^run-config key 'dp-target-epsilon' = 1.0: one round"):
        check_privacy_budget(config)
    check_privacy_budget(make_config(**{"dp-noise-multiplier": 1.0, "dp-target-epsilon": 0.0}))  # no target


def test_under_dp_the_mean_is_unweighted() -> None:
    """One client's clipped update must move the mean by at most clipping / sampled clients,
    whatever its example count: the sensitivity the noise is calibrated to."""
    states = [{"w": torch.full((2,), 1.0)}, {"w": torch.full((2,), 3.0)}]
    contents = [
        RecordDict({"arrays": ArrayRecord(s), "metrics": MetricRecord({NUM_EXAMPLES_KEY: n})})
        for s, n in zip(states, (10, 30), strict=True)
    ]
    weighted, _ = UpdateAggregator()(contents, "arrays", NUM_EXAMPLES_KEY)
    uniform, _ = UpdateAggregator(uniform_weights=True)(contents, "arrays", NUM_EXAMPLES_KEY)
    assert weighted.to_torch_state_dict()["w"].tolist() == [2.5, 2.5]
    assert uniform.to_torch_state_dict()["w"].tolist() == [2.0, 2.0]


def test_the_round_line_carries_epsilon(tmp_path: Path) -> None:
    recorder = RunRecorder(make_config(**{"results-dir": str(tmp_path), "dp-noise-multiplier": 1.0}))
    recorder.set_epsilon(1, 4.7285)
    counts = {"tn": 2, "fp": 0, "fn": 2, "tp": 0}
    student = {"loss": 0.7, "accuracy": 0.5, "mcc": 0.0, "num_examples": 4, **counts}
    recorder.finish_round(1, {"student": student})
    assert "| ε 4.729 (δ 1e-05) |" in recorder.summary_line(recorder.round(1))


def test_a_dp_run_records_epsilon_each_round_and_stops_at_its_budget(tmp_path: Path) -> None:
    """Noise multiplier 1.0, δ 1e-5: ε 4.73 after one round, 7.08 after two, 9.0 after three;
    target 7.5, 3 rounds asked: the run stops before round 3."""
    dp = {"dp-noise-multiplier": 1.0, "dp-clipping-norm": 1.0, "dp-target-epsilon": 7.5, "dp-delta": DELTA}
    overrides = {"scheme": "fedlora", "num-server-rounds": 3, **dp, **tiny_models()}
    code, results = simulate(tmp_path, **overrides)
    assert code == 0, results and results["run"]["error"]
    run, rounds = results["run"], results["rounds"]
    assert run["status"] == "completed" and "'dp-target-epsilon' = 7.5: round 3" in run["stop_reason"]
    assert [entry["round"] for entry in rounds] == [0, 1, 2]
    assert [entry["epsilon"] for entry in rounds[1:]] == [epsilon_after(k, 1.0, DELTA) for k in (1, 2)]
    privacy = results["model"]["privacy"]
    assert privacy["delta"] == DELTA and privacy["target_epsilon"] == 7.5 and privacy["weights"] == "uniform"
    # the saved student is the global model of the last round that ran
    config = make_config(**{**QUICK, **overrides, "results-dir": str(tmp_path)})
    model = load_saved_student(Path(results["artifacts"]["student"]))
    metrics = evaluate(model, loader_for(eval_split(config), config), model.device).metrics()
    assert metrics["loss"] == pytest.approx(rounds[2]["server"]["student"]["loss"], rel=1e-5)

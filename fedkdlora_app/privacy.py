"""Central differential privacy: Flower's fixed-clipping wrappers, and the (ε, δ) a run spends.

Each round whose aggregate gets noise is one Gaussian release. Under DP the mean of the
clients' clipped updates is unweighted (`UpdateAggregator.uniform_weights`), so one
client moves it by at most `dp-clipping-norm` / sampled clients, the scale Flower's
wrappers calibrate the noise to: every release has noise multiplier `dp-noise-multiplier`.
The releases are composed by Flower's own `RdpAccountant` (Rényi DP, through Google's
`dp-accounting`), add-or-remove-one client, and claim no amplification by the sampling of
clients, as Flower's fixed-clipping accounting does.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import compute_stdv
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedkdlora_app.config import ConfigError, DataSettings, RunConfig
from fedkdlora_app.results_format import Privacy
from fedkdlora_app.strategy import TrackedFedAvg

ACCOUNTANT = "flwr RdpAccountant (dp-accounting RDP), add-or-remove-one client, no sampling amplification"


class PrivacyBudgetReached(Exception):
    """The next round's release would spend more than `dp-target-epsilon`: the run ends before it."""


def dp_sampled_clients(config: DataSettings) -> int:
    """The cohort size the DP noise is calibrated for (FedAvg samples this many of the nodes)."""
    return max(1, int(config.min_available_nodes * config.fraction_train))


@cache
def epsilon_after(releases: int, noise_multiplier: float, delta: float) -> float:
    """ε at `delta` after `releases` Gaussian releases of `noise_multiplier` (0 releases: 0)."""
    if releases == 0:
        return 0.0
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=1,  # no amplification: the population does not enter ε
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    accountant.compose(GaussianPrivacyEvent(noise_multiplier, sample_size=1, population_size=1), releases)
    return accountant.get_epsilon(delta)


class PrivacyLedger:
    """The releases a run has made, its ε after each, and the budget it may not exceed."""

    def __init__(self, config: RunConfig, releases: int = 0) -> None:
        """`releases`: those of the rounds a resumed run keeps."""
        self.noise_multiplier = config.dp_noise_multiplier
        self.delta = config.dp_delta
        self.target = config.dp_target_epsilon or None
        self.releases = releases

    @property
    def epsilon(self) -> float:
        return epsilon_after(self.releases, self.noise_multiplier, self.delta)

    def check_next(self, server_round: int) -> None:
        """Raise `PrivacyBudgetReached` when round `server_round`'s release would exceed the target."""
        after = epsilon_after(self.releases + 1, self.noise_multiplier, self.delta)
        if self.target is not None and after > self.target:
            raise PrivacyBudgetReached(
                f"run-config key 'dp-target-epsilon' = {self.target}: round {server_round} would reach "
                f"ε {after:.4f} (δ {self.delta:g}); the run stops at ε {self.epsilon:.4f} "
                f"after {self.releases} noised aggregate(s)"
            )

    def released(self) -> None:
        self.releases += 1


def check_privacy_budget(config: RunConfig) -> None:
    """Before any training: a budget that cannot pay for one round is a bad setting."""
    if config.uses_dp and config.dp_target_epsilon > 0:
        first = epsilon_after(1, config.dp_noise_multiplier, config.dp_delta)
        if first > config.dp_target_epsilon:
            raise ConfigError(
                f"run-config key 'dp-target-epsilon' = {config.dp_target_epsilon}: one round at "
                f"dp-noise-multiplier {config.dp_noise_multiplier} already spends ε {first:.4f} "
                f"(δ {config.dp_delta:g}); raise the target or the noise"
            )


class _TrackedPrivacy:
    """What this project adds to Flower's DP wrappers, as a mixin before them in the MRO.

    Flower's wrappers skip a round's aggregation when any reply failed, without calling
    the inner strategy; the failures are then recorded here. Each noised aggregate is a
    release in the `PrivacyLedger`, and every round records the run's ε so far.
    """

    strategy: TrackedFedAvg
    ledger: PrivacyLedger | None = None  # set by `private_strategy`; without it, no accounting

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.ledger is not None:
            self.ledger.check_next(server_round)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if any(reply.has_error() for reply in replies):
            self.strategy.ledger.settle(server_round, "train", replies)
            log(WARNING, "round %d: DP aggregation skipped: a sampled client failed", server_round)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if self.ledger is not None:
            if arrays is not None:  # Flower's wrapper added noise: one release
                self.ledger.released()
            self.strategy.recorder.set_epsilon(server_round, self.ledger.epsilon)
        return arrays, metrics


class TrackedServerSideClippingDP(_TrackedPrivacy, DifferentialPrivacyServerSideFixedClipping):
    """Flower's central DP, clipping each update on the server."""


class TrackedClientSideClippingDP(_TrackedPrivacy, DifferentialPrivacyClientSideFixedClipping):
    """Flower's central DP, updates clipped by the clients' `fixedclipping_mod`."""


DP_WRAPPERS = {"server": TrackedServerSideClippingDP, "client": TrackedClientSideClippingDP}


def private_strategy(strategy: TrackedFedAvg, config: RunConfig, releases: int = 0) -> Strategy:
    """`strategy` inside Flower's fixed-clipping DP wrapper the run config asks for, with its ledger.

    The noise's standard deviation is multiplier x clipping norm / sampled clients; the
    sampled clients are taken as `min-available-nodes` x `fraction-train`. `releases`:
    the noised aggregates of the rounds a resumed run keeps.
    """
    wrapper = DP_WRAPPERS[config.dp_clipping](
        strategy,
        config.dp_noise_multiplier,
        config.dp_clipping_norm,
        dp_sampled_clients(config),
    )
    wrapper.ledger = PrivacyLedger(config, releases)
    return wrapper


def privacy_info(config: RunConfig) -> Privacy:
    """The DP settings for the results JSON: the Flower wrapper, the noise it adds, the accounting."""
    sampled = dp_sampled_clients(config)
    flower_wrapper = DP_WRAPPERS[config.dp_clipping].__bases__[1]
    return {
        "mechanism": flower_wrapper.__name__,
        "noise_multiplier": config.dp_noise_multiplier,
        "clipping_norm": config.dp_clipping_norm,
        "sampled_clients": sampled,
        "noise_std": compute_stdv(config.dp_noise_multiplier, config.dp_clipping_norm, sampled),
        "delta": config.dp_delta,
        "target_epsilon": config.dp_target_epsilon,
        "accountant": ACCOUNTANT,
        "weights": "uniform",
    }

"""The search's sampler: multivariate TPE after a random start.

TPE: multivariate over groups (the per-stage parameters exist only for some stage
counts); constant_liar, so parallel workers see running trials as bad and spread out.

Optuna's TPESampler counts its random start in trials, and a candidate the budget
gate rejects is a trial too (told PRUNED, with its constraints). Most random
candidates are rejected, so a 10-trial start leaves TPE modelling from a few trained
ones: it proposes architectures close to its first good ones, the median rule lets
those near-median ones finish, and the search refines before it has explored.
`TrainedStartup`, the default, counts trained candidates instead (one pruned at the
first rung counts), and TPE still learns from every rejected one, as an infeasible
trial. The live benchmark that chose it, its figures and its command are in
benchmarks/README.md, section Search efficiency.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from search.slots import is_trained

SAMPLER_STARTUP = 10  # trained candidates before TPE models (Optuna's default number)


class TrainedStartup(optuna.samplers.BaseSampler):
    """RandomSampler until `startup` candidates were trained, then TPE; rejected ones
    still teach TPE then, as infeasible trials. One instance per worker, which asks
    one trial at a time. (With the hyperband pruner Optuna shows the sampler one
    bracket's trials, so it counts that bracket's; once one bracket has `startup`,
    this worker stays on TPE.)
    """

    def __init__(self, seed: int | None, startup: int = SAMPLER_STARTUP) -> None:
        self.startup = startup
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self._tpe = tpe(seed, startup=0)
        self._now: optuna.samplers.BaseSampler = self._random

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        if self._now is self._random:  # once TPE models, it stays
            ended = study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)
            )
            if sum(map(is_trained, ended)) >= self.startup:
                self._now = self._tpe
        self._now.before_trial(study, trial)

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._now.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._now.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._now.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Any,
    ) -> None:
        self._now.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._random.reseed_rng()
        self._tpe.reseed_rng()


def tpe(seed: int | None, startup: int = SAMPLER_STARTUP) -> optuna.samplers.TPESampler:
    return optuna.samplers.TPESampler(
        multivariate=True, group=True, constant_liar=True, seed=seed, n_startup_trials=startup
    )


def make_sampler(
    seed: int | None, startup: int = SAMPLER_STARTUP, trained_only: bool = True
) -> optuna.samplers.BaseSampler:
    """`startup`: trained candidates before TPE models; with `trained_only=False`,
    Optuna's count: trials, rejected ones included."""
    return TrainedStartup(seed, startup) if trained_only else tpe(seed, startup)

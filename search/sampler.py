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

The random start draws architectures at random, but its first candidates that pass
the gate train with fixed start settings (`START`): random training settings are
mostly poor on a short trial, and the start's first results set the median that
prunes the rest (benchmarks/README.md#start-settings measured which settings and
how many).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers._tpe.sampler import (
    _get_pruned_trial_score,
    _split_complete_trials,
    default_gamma,
    default_gamma_multiobjective,
)
from optuna.search_space.group_decomposed import _GroupDecomposedSearchSpace, _SearchSpaceGroup
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from search.slots import is_trained
from search.space import training_params
from search.trainer import TrainConfig

SAMPLER_STARTUP = 10  # trained candidates before TPE models (Optuna's default number)
# The first candidates' training settings. Measured on the quick profile, on the first
# architectures of random starts (benchmarks/start_settings.py, seeds 100-104, 30 of
# them): SGD at the smallest batch without augmentation was the best of five settings
# on 28 and beat the random draw on 29, by 6-9 points on average. A batch size the
# profile lacks becomes its nearest below (else its smallest): the GPU profile's 128
# (not measured there).
START = TrainConfig(batch_size=32, lr=0.05, crop_padding=0, flip=False)
START_CANDIDATES = 1  # how many of the first candidates past the gate use them
_LIVE = (TrialState.RUNNING, TrialState.WAITING, TrialState.COMPLETE, TrialState.PRUNED)


class TrainedStartup(optuna.samplers.BaseSampler):
    """RandomSampler until `startup` candidates were trained, then TPE; rejected ones
    still teach TPE then, as infeasible trials. One instance per worker, which asks
    one trial at a time. Its first `start_candidates` past the gate train with the
    `start` settings. (With the hyperband pruner Optuna shows the sampler a bracket's
    view of the study, which filters only `get_trials`: the counts here, through
    `_get_trials`, are the whole study's.)
    """

    def __init__(
        self,
        seed: int | None,
        startup: int = SAMPLER_STARTUP,
        start: TrainConfig | None = START,
        start_candidates: int = START_CANDIDATES,
    ) -> None:
        self.startup = startup
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self._tpe = tpe(seed, startup=0)
        self._now: optuna.samplers.BaseSampler = self._random
        self._start = training_params(start) if start and start_candidates > 0 else {}
        self._start_candidates = start_candidates
        self._decided: tuple[int, bool] = (-1, False)  # (trial id, with the start settings)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        # A new trial: the study is read once for it, here or by TPE, into Optuna's per-ask
        # cache. `ask` empties it; so does this, for a trial built as `optuna.Trial(...)`.
        study._thread_local.cached_all_trials = None
        if self._now is self._random:  # once TPE models, it stays
            ended = study._get_trials(  # Optuna's read for this ask, which TPE reuses
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED), use_cache=True
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
        if param_name in self._start and self._starts_with_settings(study, trial):
            return fitted(self._start[param_name], param_distribution)
        return self._now.sample_independent(study, trial, param_name, param_distribution)

    def _starts_with_settings(self, study: Study, trial: FrozenTrial) -> bool:
        """In the random start, and fewer than `start_candidates` others of the study
        were given training settings (passed the gate) and were not failed: decided once
        a trial. Workers that start together read the study at once, so each may give
        its first candidate the start settings (up to one per worker)."""
        if self._now is not self._random:
            return False
        if self._decided[0] != trial._trial_id:  # one trial is asked at a time
            given = sum(
                "optimizer" in t.params
                for t in study._get_trials(deepcopy=False, states=_LIVE, use_cache=True)
                if t.number != trial.number
            )
            self._decided = (trial._trial_id, given < self._start_candidates)
        return self._decided[1]

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


def fitted(value: Any, dist: BaseDistribution) -> Any:
    """`value` as a choice of `dist`: a batch size the profile does not offer becomes the
    largest one below it (else the smallest). The start's other values are in the space."""
    if not isinstance(dist, CategoricalDistribution) or value in dist.choices:
        return value
    below = [c for c in dist.choices if c <= value]
    return max(below) if below else min(dist.choices)


class _NewTrialsOnly(_GroupDecomposedSearchSpace):
    """Optuna's group decomposition, fed each finished trial once. Optuna's feeds every
    finished trial again at every ask; a trial already fed is a no-op then (the groups
    already separate its parameters), so the groups, and their order, are the same."""

    def __init__(self) -> None:
        super().__init__(include_pruned=True)
        self._fed: set[int] = set()

    def calculate(self, study: Study, use_cache: bool = False) -> _SearchSpaceGroup:
        if self._study_id is None:
            self._study_id = study._study_id
        elif self._study_id != study._study_id:
            raise ValueError("`_GroupDecomposedSearchSpace` cannot handle multiple studies.")
        states = (TrialState.COMPLETE, TrialState.PRUNED)
        for trial in study._get_trials(deepcopy=False, states=states, use_cache=True):
            if trial._trial_id not in self._fed:
                self._fed.add(trial._trial_id)
                self._search_space.add_distributions(trial.distributions)
        return copy.deepcopy(self._search_space)


class FastTPE(optuna.samplers.TPESampler):
    """Optuna's TPE with the same samples and less work per ask as a study grows.

    With `group=True` TPE samples each group of parameters that occur together
    (the stages' own, the training settings', ...: 8 groups here) and, for each,
    reads every trial of the study, splits them into good and bad (parsing every
    trial's constraints) and converts every trial's parameters: at 3,000 trials
    0.3 s of CPU per ask, most of it that split, repeated 8 times. Here the
    trials are read and split once per ask, a finished trial's infeasibility
    and internal values are computed once, and the group decomposition is fed
    only new trials (benchmarks/README.md#service-overhead). The study is read
    once per ask, into Optuna's own per-ask cache (`use_cache`, reset by `ask`),
    which the search space, the split and every group share; Optuna's own
    TPESampler reads it again for the space and for the split (with
    constant_liar), a round trip each.
    What TPE models and draws is Optuna's: tests/test_sampler.py checks the
    draws are identical (while other workers write, Optuna's later reads may see
    a trial that this ask's one read did not).
    `_sample` and `_split_trials` below are Optuna 5.0's, less the repeated work.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self._group:
            self._group_decomposed_search_space = _NewTrialsOnly()
        self._ask: dict[str, Any] | None = None
        self._scores: dict[int, float] = {}  # infeasibility of finished trials
        self._pruned: dict[int, tuple[float, float]] = {}  # pruned ones' rank keys
        self._finished = _Finished()  # finished trials' params, in the order first seen
        self._tables: dict[tuple[str, ...], _Table] = {}  # their internal values per group

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        self._ask = {}
        try:
            return super().sample_relative(study, trial, search_space)
        finally:
            self._ask = None

    def _sample(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if self._ask is None:  # an independent sample: Optuna's, as it is
            return super()._sample(study, trial, search_space)
        if "split" not in self._ask:
            self._ask["split"] = self._split(study, trial)
        below_trials, above_trials = self._ask["split"]
        mpe_below = self._build_parzen_estimator(
            study, search_space, below_trials, handle_below=True
        )
        mpe_above = self._build_parzen_estimator(
            study, search_space, above_trials, handle_below=False
        )
        samples_below = mpe_below.sample(self._rng.rng, self._n_ei_candidates)
        acq_func_vals = self._compute_acquisition_func(samples_below, mpe_below, mpe_above)
        ret = optuna.samplers.TPESampler._compare(samples_below, acq_func_vals)
        for param_name, dist in search_space.items():
            ret[param_name] = dist.to_external_repr(ret[param_name])
        return ret

    def _split(
        self, study: Study, trial: FrozenTrial
    ) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
        running = [TrialState.RUNNING] if self._constant_liar else []
        states = [TrialState.COMPLETE, TrialState.PRUNED, *running]
        trials = study._get_trials(deepcopy=False, states=states, use_cache=True)
        if self._constant_liar:
            trials = [t for t in trials if trial.number != t.number]
        if self._gamma is None:
            one = len(study.directions) <= 1
            self._gamma = default_gamma if one else default_gamma_multiobjective
        n = sum(t.state != TrialState.RUNNING for t in trials)  # running ones are ignored
        return self._split_trials(study, trials, self._gamma(n))

    def _split_trials(
        self, study: Study, trials: list[FrozenTrial], n_below: int
    ) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
        """Optuna's `_split_trials`, a finished trial's infeasibility computed once."""
        running, infeasible, complete, pruned = [], [], [], []
        for t in trials:
            if t.state == TrialState.RUNNING:  # its constraints are not set yet
                running.append(t)
            elif self._infeasibility(t) > 0:
                infeasible.append(t)
            elif t.state == TrialState.COMPLETE:
                complete.append(t)
            else:
                pruned.append(t)
        below_complete, above_complete = _split_complete_trials(complete, study, n_below)
        n_below = max(0, n_below - len(below_complete))
        pruned.sort(key=lambda t: self._pruned_score(t, study))  # Optuna's order, kept keys
        n_pruned = min(n_below, len(pruned))
        below_pruned, above_pruned = pruned[:n_pruned], pruned[n_pruned:]
        n_below = min(max(0, n_below - len(below_pruned)), len(infeasible))
        infeasible.sort(key=self._infeasibility)
        below = below_complete + below_pruned + infeasible[:n_below]
        above = above_complete + above_pruned + infeasible[n_below:] + running
        below.sort(key=lambda t: t.number)
        above.sort(key=lambda t: t.number)
        return below, above

    def _get_internal_repr(
        self, trials: list[FrozenTrial], search_space: dict[str, BaseDistribution], study: Study
    ) -> dict[str, np.ndarray]:
        """Optuna's, from a table per group of finished trials' internal values, each
        converted once (a name's distribution is the same in every trial of a study, so
        is its internal value): where the trials are is found once per ask, not per group."""
        if not trials:
            return {name: np.asarray(()) for name in search_space}
        key = tuple(search_space)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = _Table(search_space)
        at = self._where(trials)
        table.fill(self._finished)
        values = np.empty((len(trials), len(key)))
        has = np.empty(len(trials), dtype=bool)
        done = at >= 0
        values[done], has[done] = table.values[at[done]], table.has[at[done]]
        # running trials: their relative params so far, parsed from JSON once per ask
        parsed = self._ask.setdefault("params", {}) if self._ask is not None else {}
        for i in np.flatnonzero(~done):
            t = trials[i]
            if t._trial_id not in parsed:
                parsed[t._trial_id] = self._get_params(t, study)
            row = _row(parsed[t._trial_id], search_space)
            has[i] = row is not None
            if row is not None:
                values[i] = row
        kept = values[has]
        if not len(kept):  # as Optuna's: empty float arrays
            return {name: np.asarray(()) for name in search_space}
        return {
            name: kept[:, j].astype(np.int64) if isinstance(d, CategoricalDistribution)
            else kept[:, j]
            for j, (name, d) in enumerate(search_space.items())
        }  # fmt: skip

    def _where(self, trials: list[FrozenTrial]) -> np.ndarray:
        """Each trial's place in the finished trials' tables; -1 for a running one. The
        same list serves every group of an ask: found once."""
        kept = self._ask.setdefault("where", {}) if self._ask is not None else {}
        if id(trials) in kept:  # held in `kept`, so no other list has its id meanwhile
            return kept[id(trials)][1]
        at = np.fromiter((self._finished.place(t) for t in trials), np.intp, len(trials))
        kept[id(trials)] = (trials, at)
        return at

    def _pruned_score(self, trial: FrozenTrial, study: Study) -> tuple[float, float]:
        """Optuna's rank of a pruned trial (its last step, then its value there), kept."""
        score = self._pruned.get(trial._trial_id)
        if score is None:
            score = self._pruned[trial._trial_id] = _get_pruned_trial_score(trial, study)
        return score

    def _infeasibility(self, trial: FrozenTrial) -> float:
        """The sum of its violated constraints (Optuna's score); a finished trial's is kept."""
        score = self._scores.get(trial._trial_id)
        if score is None:
            score = sum(v for v in trial.constraints.values() if v > 0)
            self._scores[trial._trial_id] = score
        return score


class _Finished:
    """The finished trials' params, each given a place when first seen (their params
    never change)."""

    def __init__(self) -> None:
        self.places: dict[int, int] = {}
        self.params: list[dict[str, Any]] = []

    def place(self, trial: FrozenTrial) -> int:
        at = self.places.get(trial._trial_id)
        if at is None:
            if not trial.state.is_finished():
                return -1
            at = self.places[trial._trial_id] = len(self.params)
            self.params.append(trial.params)
        return at


class _Table:
    """One group's internal values of the finished trials, by place; `has`: the trial
    has every parameter of the group. Filled as trials are placed."""

    def __init__(self, search_space: dict[str, BaseDistribution]) -> None:
        self.space = search_space
        self.values = np.empty((0, len(search_space)))
        self.has = np.empty(0, dtype=bool)

    def fill(self, finished: _Finished) -> None:
        n, total = len(self.has), len(finished.params)
        if n == total:
            return
        rows = [_row(p, self.space) for p in finished.params[n:]]
        new = np.array([r if r is not None else (0.0,) * len(self.space) for r in rows])
        self.values = np.concatenate([self.values, new.reshape(len(rows), len(self.space))])
        self.has = np.concatenate([self.has, [r is not None for r in rows]])


def _row(params: dict[str, Any], search_space: dict[str, BaseDistribution]) -> tuple | None:
    """A trial's internal values of a group's parameters; None if it lacks one."""
    if not search_space.keys() <= params.keys():
        return None
    return tuple(d.to_internal_repr(params[name]) for name, d in search_space.items())


def tpe(
    seed: int | None, startup: int = SAMPLER_STARTUP, fast: bool = True
) -> optuna.samplers.TPESampler:
    """The search's TPE; `fast=False`: Optuna's own class (the same samples, slower)."""
    cls = FastTPE if fast else optuna.samplers.TPESampler
    return cls(
        multivariate=True, group=True, constant_liar=True, seed=seed, n_startup_trials=startup
    )


def make_sampler(
    seed: int | None,
    startup: int = SAMPLER_STARTUP,
    trained_only: bool = True,
    start_candidates: int = START_CANDIDATES,
) -> optuna.samplers.BaseSampler:
    """`startup`: trained candidates before TPE models; with `trained_only=False`,
    Optuna's count: trials, rejected ones included (and no start settings).
    `start_candidates`: the first ones past the gate that train with `START`."""
    if not trained_only:
        return tpe(seed, startup)
    return TrainedStartup(seed, startup, START, start_candidates)

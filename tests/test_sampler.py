"""The search's TPE draws exactly what Optuna's TPE draws, with less work per ask."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from search import space
from search.draft import drafting, is_draft, write
from search.limits import Limits
from search.profile import QUICK
from search.sampler import FastTPE, tpe
from search.worker import gate


def history(
    sampler: optuna.samplers.BaseSampler, asks: int, limits: Limits, drafts: bool = False
) -> list[dict]:
    """A study as the search makes them: the real space, rejected candidates with their
    constraints, pruned ones with intermediate values, some running for a few asks and
    then finishing out of order. `drafts`: new trials drafted and written once."""
    study = optuna.create_study(direction="maximize", sampler=sampler)
    asking = drafting(study) if drafts else study
    drawn, running = [], []
    for i in range(asks):
        trial = asking.ask()
        spec = space.suggest_arch(trial, (1, 28, 10), limits)
        if not gate(trial, spec, limits):
            if is_draft(trial):
                write(study, trial, TrialState.PRUNED)
            else:
                study.tell(trial, state=TrialState.PRUNED)
        else:
            cfg = space.suggest_training(trial, QUICK, 20_000, 0)
            if is_draft(trial):
                trial = optuna.Trial(study, write(study, trial, TrialState.RUNNING)._trial_id)
            score = 0.9 - 0.1 * abs(math.log10(cfg.lr / 0.03)) - 0.02 * spec.stages[0].kernel
            if i % 3 == 0:
                trial.report(score - 0.2, 1)
                study.tell(trial, state=TrialState.PRUNED)
            elif i % 4 == 1:  # runs on while others are sampled: constant_liar's case
                running.append((trial, score))
            else:
                trial.report(score - 0.1, 1)
                study.tell(trial, score)
        if len(running) > 2:  # the oldest finishes after younger ones did
            late, score = running.pop(0)
            study.tell(late, score)
        drawn.append(trial.params)
    return drawn


@pytest.mark.parametrize(
    "limits",
    [Limits(1_000_000, 20_000_000), Limits(60_000, 3_000_000)],  # most rejected: TPE's
    ids=["some rejected", "most rejected"],  # good side takes infeasible ones too
)
@pytest.mark.parametrize("drafts", [False, True], ids=["asked", "drafted"])
def test_fast_tpe_draws_what_optunas_tpe_draws(limits, drafts) -> None:
    """Against Optuna's TPESampler on trials asked and told the plain way."""
    ours = history(tpe(3, startup=10), 70, limits, drafts)
    optunas = history(tpe(3, startup=10, fast=False), 70, limits)
    assert ours == optunas
    assert len({str(sorted(p.items())) for p in ours[10:]}) > 40  # TPE drew, not one point


def test_the_search_uses_the_fast_tpe() -> None:
    assert isinstance(tpe(0), FastTPE) and not isinstance(tpe(0, fast=False), FastTPE)

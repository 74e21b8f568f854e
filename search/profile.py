"""How long a trial is and where it reports: the trial profile, recorded on the study.

A trial's length is a number of training images seen, not epochs, so a small
image folder and a 60,000-image dataset both give every candidate enough
optimizer steps. Batch sizes are fitted to it: only those that leave at least
`min_steps` steps are offered to the sampler. Validation runs at `rungs`
(fractions of the length), which is where the pruner decides.

Why the quick profile first looks at 1/8 of a trial: that look is noisy but
cheap, and pruning rules replayed on a table of measured candidates
(benchmarks/rung_ranking.py) all did better from 1/8 than from 1/4. For the same
reason the median rule (search/study.py) acts from the first completed trial on:
waiting for more costs most of what pruning saves. Live, with TPE, the early look
paid only once TPE's random start counted trained candidates (search/sampler.py).
The median rule stays the default pruner: no other beat it live by more than the
noise, and it needs no resource settings. Figures and commands: benchmarks/README.md,
sections Rung ranking and Search efficiency.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

BATCH_SIZES = (32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class Profile:
    name: str
    images: int  # training images seen per trial
    rungs: tuple[float, ...]  # validation at these fractions of `images`
    min_steps: int  # a batch size must leave at least this many optimizer steps
    batch_sizes: tuple[int, ...]  # offered to the sampler, before the fit to min_steps
    train_images: int | None = None  # a stratified subset of the training split; None: all
    val_images: int | None = None
    max_macs: int | None = None  # a compute cap, per image

    def batch_choices(self, n_train: int) -> tuple[int, ...]:
        """Batch sizes that give `min_steps` steps and at least 4 batches per pass."""
        fit = tuple(
            b for b in self.batch_sizes if b * self.min_steps <= self.images and 4 * b <= n_train
        )
        return fit or (min(self.batch_sizes),)

    def override(self, **changes: Any) -> Profile:
        """The profile with the user's flags applied; it is no longer the named one."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes or all(getattr(self, k) == v for k, v in changes.items()):
            return self
        return replace(self, name=f"{self.name}+custom", **changes)

    def rung_images(self) -> list[int]:
        """Training images seen at each rung: the pruner's steps."""
        return [round(f * self.images) for f in self.rungs]

    def describe(self, n_train: int) -> str:
        rungs = ", ".join(f"{n:,}" for n in self.rung_images())
        choices = self.batch_choices(n_train)
        steps = self.images // max(choices)
        # When no batch size fits, the smallest is used anyway: say what it gives.
        fits = f">= {self.min_steps} steps" if steps >= self.min_steps else f"{steps} steps"
        return (
            f"{self.name} profile: {self.images:,} training images per trial "
            f"(validation after {rungs}), batch sizes {list(choices)} ({fits})"
            + (f", at most {self.max_macs:,} MACs/image" if self.max_macs else "")
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rungs"] = list(self.rungs)
        d["batch_sizes"] = list(self.batch_sizes)
        return d


# The CPU demo: small, fast candidates on a stratified subset; a trial is seconds on 2 cores.
QUICK = Profile(
    name="quick",
    images=24_000,
    # A first look at 1/8 of the trial: why, in the module docstring.
    rungs=(0.125, 0.25, 0.5, 1.0),
    min_steps=250,
    batch_sizes=(32, 64, 96, 128),
    train_images=20_000,
    val_images=2_000,
    max_macs=20_000_000,
)

# A GPU trial: about 10 CIFAR-10 epochs, seconds on an H100 with this trainer.
DEFAULT = Profile(
    name="default",
    images=450_000,
    rungs=(1 / 9, 1 / 3, 1.0),
    min_steps=400,
    batch_sizes=(128, 256, 512, 1024),
)

PROFILES = {"quick": QUICK, "default": DEFAULT}

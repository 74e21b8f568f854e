"""The final horizon: the length of the final training the search's choice is made for.

A trial is short (the quick profile: 24,000 images), and the network a user ships is
trained much longer (`search.train`: 30 epochs of the whole training set by default,
75 quick trials). Short training favours small networks that learn fast, long training
favours capacity, so which network is "best" depends on the length it is trained
for. The horizon says that length: recorded on the study (`horizon`), in every export,
printed when a search starts and ends, and the default length of `search.train`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import optuna

from search.cli import duration

FINAL_EPOCHS = 30  # search.train's default: epochs of the whole training set


@dataclass(frozen=True)
class Horizon:
    epochs: int  # of the whole training set
    train_images: int  # the whole training set (not the search's split)

    @property
    def images(self) -> int:
        return self.epochs * self.train_images

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"images": self.images}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Horizon:
        return cls(int(d["epochs"]), int(d["train_images"]))

    def describe(self, trial_images: int) -> str:
        return (
            f"horizon: a final training of {self.epochs} epochs of the {self.train_images:,} "
            f"training images ({self.images:,} images, {self.images / trial_images:.0f}x a "
            "trial); the trials rank candidates after their short training"
        )


def study_horizon(study: optuna.Study, epochs: int | None, train_images: int) -> Horizon:
    """The study's horizon: `epochs` when given (recorded, replacing an earlier one: the
    horizon changes the choice, not the trials), else the one recorded, else the default."""
    recorded = study.user_attrs.get("horizon")
    if epochs is None and recorded is not None:
        return Horizon.from_dict(recorded)
    horizon = Horizon(epochs or FINAL_EPOCHS, train_images)
    if recorded != horizon.to_dict():
        study.set_user_attr("horizon", horizon.to_dict())
    return horizon


def cost(runs: int, epochs: int, train_images: int, images_per_s: float | None) -> str:
    """What a final training costs: its runs and images, and the time at a speed."""
    images = epochs * train_images
    text = f"{runs} run(s) of {epochs} epochs x {train_images:,} images ({images:,} images a run)"
    if images_per_s:
        text += f", about {duration(runs * images / images_per_s)} at {images_per_s:,.0f} images/s"
    return text

"""What a trial, or a final training, will cost on this machine, said before it starts.

The candidates the space proposes first (a seeded random sample that fits the
limits) give the spread of MACs; two of them, timed for a few steps, give this
device's speed; the profile gives the images per trial.
"""

from __future__ import annotations

import optuna

from models import ArchSpec
from search import space
from search.data import Dataset, Split
from search.trainer import TrainConfig, train
from search.worker import Search


def estimate_trial_seconds(search: Search, samples: int = 24) -> tuple[float, float, float]:
    """(typical, fastest, slowest) seconds of a full trial here, for the candidates the space
    proposes first: their MACs, and this device's speed timed on two of them."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=search.seed))
    found: list[tuple[int, ArchSpec, TrainConfig]] = []
    for _ in range(20 * samples):
        if len(found) == samples:
            break
        trial = study.ask()
        spec = space.suggest_arch(trial, search.data.shape, search.limits)
        if search.limits.fits(spec):
            cfg = space.suggest_training(trial, search.profile, len(search.data.train_y), 0)
            found.append((search.limits.measure(spec)["macs"], spec, cfg))
        study.tell(trial, 0.0)
    if not found:  # the limits leave little room: time the smallest candidate
        spec = space.smallest(search.data.shape)
        found = [(search.limits.measure(spec)["macs"], spec, TrainConfig(batch_size=64))]
    found.sort(key=lambda f: f[0])
    rates = [_macs_per_second(found[i][1], found[i][2], search) for i in (len(found) // 4, -1)]
    # Small networks use the device less well: interpolate the speed in MACs.
    lo, hi = found[len(found) // 4][0], found[-1][0]
    p = search.profile

    def seconds(macs: int) -> float:
        t = 0.0 if hi == lo else min(1.0, max(0.0, (macs - lo) / (hi - lo)))
        rate = rates[0] + t * (rates[1] - rates[0])
        val = len(search.data.val_y) * len(p.rungs) / 3  # a forward pass is ~1/3 of a step
        return macs * (p.images + val) / rate

    times = sorted(seconds(m) for m, _, _ in found)
    return times[len(times) // 2], times[0], times[-1]


def _macs_per_second(spec: ArchSpec, cfg: TrainConfig, search: Search) -> float:
    """Training MACs per second of one candidate: a few timed steps after a warm-up."""
    d, bs = search.data, min(cfg.batch_size, len(search.data.train_y))
    n = min(len(d.train_y), 6 * bs)
    split = Split(d.train_x[:n], d.train_y[:n], d.mean, d.std)
    train(spec, TrainConfig(images=2 * bs, batch_size=bs, seed=0), split, device=search.device)
    timed = TrainConfig(images=n, batch_size=bs, seed=0)
    result = train(spec, timed, split, device=search.device)
    return search.limits.measure(spec)["macs"] * result.images_per_s


def final_images_per_s(spec: ArchSpec, cfg: TrainConfig, data: Dataset, device: object) -> float:
    """Training images/s of `spec` with its settings on this device: 6 timed steps after
    2 of warm-up, on the first images of the training set (a second or two)."""
    bs = min(cfg.batch_size, len(data.train_y))
    n = min(len(data.train_y), 6 * bs)
    split = Split(data.train_x[:n], data.train_y[:n], data.mean, data.std)
    warm = TrainConfig.from_dict(cfg.to_dict() | {"images": 2 * bs, "batch_size": bs})
    train(spec, warm, split, device=device)
    timed = TrainConfig.from_dict(cfg.to_dict() | {"images": n, "batch_size": bs})
    return train(spec, timed, split, device=device).images_per_s

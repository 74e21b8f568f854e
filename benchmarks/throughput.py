"""Training images/s: search/train.py against the classic DataLoader loop.

python -m benchmarks.throughput [--device cpu|cuda] [--preset resnet18-2111]

Same model, same CIFAR-shaped uint8 data (random pixels: throughput does not
depend on content, and CIFAR-10 cannot be downloaded everywhere), same
optimizer, same device. The classic loop is what most CIFAR-10 code runs:
PIL images, RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor +
Normalize in DataLoader workers, fp32. It is also run with this trainer's
compute settings (channels_last, and bf16 autocast on CUDA) so the gain of the
data pipeline alone is visible. The first epoch of each is a warm-up; the
second is timed.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch import nn

from benchmarks.machine import save
from models import build_model, count_params
from models.presets import preset
from search.data import Split
from search.trainer import TrainConfig, make_optimizer, resolve_device, train

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class UInt8Images(torch.utils.data.Dataset):
    """A CIFAR10-like dataset: PIL image per item, torchvision transforms."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def classic_loop(
    spec,
    cfg: TrainConfig,
    x: np.ndarray,
    y: np.ndarray,
    device: torch.device,
    workers: int,
    fast_compute: bool,
) -> float:
    """Images/s of the second epoch of the classic pipeline."""
    import torchvision.transforms as T

    transform = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    loader = torch.utils.data.DataLoader(
        UInt8Images(x, y, transform),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    torch.manual_seed(cfg.seed)
    fmt = torch.channels_last if fast_compute else torch.contiguous_format
    model = build_model(spec).to(device, memory_format=fmt)
    opt = make_optimizer(model, cfg)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    amp = fast_compute and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rate = 0.0
    for _epoch in range(2):
        t0, seen = time.perf_counter(), 0
        for xb, yb in loader:
            xb = xb.to(device, non_blocking=True, memory_format=fmt)
            yb = yb.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = criterion(model(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(yb)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rate = seen / (time.perf_counter() - t0)
    return rate


def measure(
    name: str,
    device: torch.device,
    images: int,
    batch_size: int,
    workers: int,
    classic_images: int | None = None,
    into: dict | None = None,
) -> dict:
    """Preset `name` at 3x32x32: this trainer, the classic loop, and the classic loop with
    this trainer's compute settings, in images/s. `classic_images` per epoch of the classic
    loops (default `images`): on a GPU they are many times slower. The figures go into
    `into` (a new dict by default) as they come, so a failing loop keeps the earlier ones."""
    result = {} if into is None else into
    spec = preset(name)
    cfg = TrainConfig(images=2 * images, batch_size=batch_size, lr=0.05, label_smoothing=0.1)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, images).astype(np.int64)
    n_classic = min(classic_images or images, images)
    result.update(preset=name, params=count_params(spec), images=images, classic_images=n_classic)
    result.update(batch_size=batch_size, classic_workers=workers)
    print(
        f"{name} ({count_params(spec):,} params) on {device}, {images:,} images/epoch "
        f"({n_classic:,} for the classic loop), batch {batch_size}, classic loop with "
        f"{workers} workers",
        flush=True,
    )

    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    split = Split(xt, torch.from_numpy(y), MEAN, STD)
    res = train(spec, cfg, split, device=device, rungs=(0.5, 1.0))
    ours = res.history[-1].images_per_s
    result.update(trainer_images_per_s=ours, graphed=res.graphed, graph_error=res.graph_error)
    print(f"  this trainer:            {ours:10,.0f} images/s", flush=True)
    if device.type == "cuda":  # the trainer before CUDA graphs, for the record
        eager = train(spec, cfg, split, device=device, rungs=(0.5, 1.0), graphs=False)
        result["trainer_eager_images_per_s"] = eager.history[-1].images_per_s
        print(f"  this trainer, eager:     {result['trainer_eager_images_per_s']:10,.0f} images/s")
    xc, yc = x[:n_classic], y[:n_classic]
    classic = classic_loop(spec, cfg, xc, yc, device, workers, fast_compute=False)
    result.update(classic_images_per_s=classic, ratio=ours / classic)
    print(f"  classic DataLoader loop: {classic:10,.0f} images/s   ratio {ours / classic:.2f}x")
    # The same memory format (and bf16 on CUDA) on both sides: the ratio is the data pipeline's.
    fast = classic_loop(spec, cfg, xc, yc, device, workers, fast_compute=True)
    result.update(classic_same_compute_images_per_s=fast, ratio_same_compute=ours / fast)
    print(f"  classic, same compute settings: {fast:10,.0f} images/s   ratio {ours / fast:.2f}x")
    return result


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_compiled(
    name: str,
    device: torch.device,
    images: int,
    batch_size: int,
    modes: tuple[str, ...] = ("eager", "graphs", "default", "reduce-overhead"),
    into: dict | None = None,
) -> dict:
    """This trainer's step as it runs by default on CUDA (graphs: the model's forward and
    backward captured by `graph_model`), eager, and with its model under
    `torch.compile(mode)`: seconds from the start of the run to the end of its first step
    (capture, compilation), images/s over `images` after 3 more warm-up steps, and the
    trial length in images past which the mode pays against eager (its extra seconds
    over the seconds it saves per image). The weight average and evaluation stay out:
    a measurement of the step; torch.compile is not a product mode."""
    from search.trainer import _Run

    result = {} if into is None else into
    spec = preset(name)
    cfg = TrainConfig(images=images, batch_size=batch_size, lr=0.05, label_smoothing=0.1, ema=0)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (images, 3, 32, 32), dtype=np.uint8))
    split = Split(x, torch.from_numpy(rng.integers(0, 10, images)), MEAN, STD)
    result.update(preset=name, params=count_params(spec), images=images, batch_size=batch_size)
    for mode in modes:
        torch._dynamo.reset()
        sync(device)
        t0 = time.perf_counter()
        run = _Run(spec, cfg, split, device, graphs=mode == "graphs")
        if mode not in ("eager", "graphs"):
            run.model = torch.compile(run.model, mode=mode)  # the optimizer's parameters
        run.step()
        sync(device)
        first = time.perf_counter() - t0
        for _ in range(3):
            run.step()
        sync(device)
        steps = max(1, images // batch_size)
        t0 = time.perf_counter()
        for _ in range(steps):
            run.step()
        sync(device)
        rate = steps * batch_size / (time.perf_counter() - t0)
        result[mode] = {"first_step_s": round(first, 3), "images_per_s": round(rate)}
        if mode == "graphs" and run.graph_error:
            result[mode]["graph_error"] = run.graph_error
        print(f"  {mode:>16}: first step {first:6.2f} s, then {rate:10,.0f} images/s", flush=True)
        del run
    eager = result.get("eager")
    for mode in modes:
        r = result[mode]
        if eager is None or mode == "eager":
            continue
        saved = 1 / eager["images_per_s"] - 1 / r["images_per_s"]  # seconds per image
        extra = r["first_step_s"] - eager["first_step_s"]
        r["speedup"] = round(r["images_per_s"] / eager["images_per_s"], 2)
        r["pays_after_images"] = round(extra / saved) if saved > 0 else None
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--preset", default="resnet18-2111")
    ap.add_argument(
        "--images",
        type=int,
        default=None,
        help="images per epoch (default: 50,000 on CUDA, 1,536 on the CPU)",
    )
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers of the classic loop (default: min(8, cores))",
    )
    args = ap.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    n = args.images or (50_000 if cuda else 1_536)
    bs = args.batch_size or (512 if cuda else 128)
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    result = measure(args.preset, device, n, bs, workers)
    print(f"wrote {save('throughput', result, str(device))}")


if __name__ == "__main__":
    main()

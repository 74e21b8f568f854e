"""The trainer: whole splits on the device as uint8, batched augmentation, no DataLoader.

`train()` serves both the short search trials (with a validation split and a
per-epoch callback that may prune) and the final training of
`python -m search.train` (train+val, then the test split).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from models import ArchSpec, build_model
from search.data import augment

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine")


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the weights are useless from here on."""


class OutOfMemory(Exception):
    """The device ran out of memory for this model and batch size."""


@dataclass(frozen=True)
class TrainConfig:
    """Training settings: what the search samples next to the architecture."""

    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "sgd"  # SGD with Nesterov momentum 0.9, or AdamW
    lr: float = 0.1  # peak learning rate
    weight_decay: float = 5e-4  # on conv and linear weights only
    label_smoothing: float = 0.1
    schedule: str = "onecycle"  # linear warmup, then linear (onecycle) or cosine decay
    warmup: float = 0.2  # fraction of all steps spent warming up
    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs", ">= 1"),
            (self.batch_size >= 2, "batch_size", ">= 2"),
            (self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}"),
            (self.lr > 0 and math.isfinite(self.lr), "lr", "a positive number"),
            (self.weight_decay >= 0, "weight_decay", ">= 0"),
            (0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)"),
            (self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}"),
            (0 <= self.warmup < 1, "warmup", "in [0, 1)"),
            (self.crop_padding >= 0, "crop_padding", ">= 0"),
            (self.cutout >= 0, "cutout", ">= 0"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise ValueError(f"unknown training setting(s): {', '.join(extra)}")
        return cls(**data)


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    lr: float
    seconds: float  # wall time of this epoch's training steps
    images_per_s: float


@dataclass
class TrainResult:
    model: nn.Module
    history: list[EpochStats] = field(default_factory=list)
    train_seconds: float = 0.0  # training steps only
    total_seconds: float = 0.0  # with evaluation and setup
    images_per_s: float = 0.0  # training images per second of training steps
    device: str = "cpu"
    val_pred: torch.Tensor | None = None  # predictions of the last validation pass


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def lr_factor(step: int, total: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at `step` (0-based) of `total`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)


class Normalize:
    """uint8 batch -> normalised float in the model's memory format."""

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        memory_format: torch.memory_format,
    ) -> None:
        self.scale = (1 / (255 * torch.tensor(std, device=device))).view(1, -1, 1, 1)
        self.shift = torch.tensor(mean, device=device) / torch.tensor(std, device=device)
        self.shift = self.shift.view(1, -1, 1, 1)
        self.memory_format = memory_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(memory_format=self.memory_format).float()
        return x.mul_(self.scale).sub_(self.shift)


@torch.inference_mode()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Normalize, batch_size: int = 1024
) -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy, predictions on the device) over a uint8 split on the device."""
    was_training = model.training
    model.eval()
    device = x.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    preds = []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            out = model(norm(xb)).float()
            loss_sum += nn.functional.cross_entropy(out, yb, reduction="sum")
            preds.append(out.argmax(1))
    model.train(was_training)
    pred = torch.cat(preds)
    acc = (pred == y).float().mean().item()
    return loss_sum.item() / len(y), acc, pred


def train(
    spec: ArchSpec,
    cfg: TrainConfig,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor | None = None,
    val_y: torch.Tensor | None = None,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device | str = "cpu",
    on_epoch: Callable[[EpochStats, nn.Module], None] | None = None,
) -> TrainResult:
    """Train `spec` from scratch; `on_epoch` sees every epoch and may raise to stop.

    Raises TrainingDiverged on a NaN/inf loss and OutOfMemory when the device
    cannot hold the model and batch.
    """
    device = torch.device(device)
    try:
        return _train(spec, cfg, train_x, train_y, val_x, val_y, mean, std, device, on_epoch)
    except torch.OutOfMemoryError as e:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        first_line = str(e).splitlines()[0] if str(e) else "out of memory"
        raise OutOfMemory(
            f"out of memory on {device} at batch size {cfg.batch_size}: {first_line}"
        ) from None


def _train(spec, cfg, train_x, train_y, val_x, val_y, mean, std, device, on_epoch) -> TrainResult:
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # channels_last feeds Tensor Cores on CUDA, and on this project's 2-core CPU it
    # trained the DESIGN.md example 1.5x faster (138 vs 92 images/s) than NCHW.
    fmt = torch.channels_last
    model = build_model(spec).to(device, memory_format=fmt)
    norm = Normalize(mean, std, device, fmt)
    train_x, train_y = train_x.to(device), train_y.to(device)
    if val_x is not None:
        val_x, val_y = val_x.to(device), val_y.to(device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)

    n = len(train_x)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = n // bs  # the ragged tail is dropped: BatchNorm hates tiny batches
    total = steps_per_epoch * cfg.epochs
    opt = make_optimizer(model, cfg)
    warmup = round(cfg.warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup, cfg.schedule)
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    result = TrainResult(model=model, device=str(device))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(n, device=device, generator=g)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        lr = opt.param_groups[0]["lr"]
        for i in range(steps_per_epoch):
            idx = order[i * bs : (i + 1) * bs]
            xb = augment(train_x[idx], g, cfg.crop_padding, cfg.flip, cfg.cutout)
            yb = train_y[idx]
            with autocast:
                out = model(norm(xb))
                loss = criterion(out.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(yb)
            correct += (out.argmax(1) == yb).sum()
            if i % 50 == 49 and not torch.isfinite(loss_sum):
                break
        seen = steps_per_epoch * bs
        train_loss = loss_sum.item() / seen
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"loss became {train_loss} in epoch {epoch} (lr {lr:.3g})")
        result.train_seconds += seconds
        val_loss = val_acc = None
        if val_x is not None:
            val_loss, val_acc, result.val_pred = evaluate(model, val_x, val_y, norm)
        stats = EpochStats(
            epoch, train_loss, correct.item() / seen, val_loss, val_acc, lr, seconds, seen / seconds
        )
        result.history.append(stats)
        if on_epoch is not None:
            on_epoch(stats, model)
    result.images_per_s = steps_per_epoch * bs * cfg.epochs / max(result.train_seconds, 1e-9)
    result.total_seconds = time.perf_counter() - start
    return result


# --- final training: python -m search.train -------------------------------------------


def confusion_matrix(y: torch.Tensor, pred: torch.Tensor, classes: int) -> list[list[int]]:
    """Rows are true classes, columns predictions."""
    m = torch.bincount(y.cpu() * classes + pred.cpu(), minlength=classes * classes)
    return m.view(classes, classes).tolist()


def final_training(
    spec: ArchSpec,
    cfg: TrainConfig,
    data,
    device: torch.device,
    on_epoch: Callable[[EpochStats, nn.Module], None] | None = None,
) -> tuple[dict[str, Any], nn.Module]:
    """Train on the whole training set (train + val) and measure the test split.

    The test split is evaluated after every epoch for the learning curves;
    nothing is selected on it, so the final number stays an honest estimate.
    The last epoch's evaluation is the reported one.
    """
    from models import count_macs, count_params
    from search.env import device_name, versions

    check_input(spec, data)
    mean, std = data.mean, data.std
    res = train(
        spec,
        cfg,
        data.train_x,
        data.train_y,
        data.test_x,
        data.test_y,
        mean=mean,
        std=std,
        device=device,
        on_epoch=on_epoch,
    )
    last = res.history[-1]
    result = {
        "architecture": spec.to_dict(),
        "params": count_params(spec),
        "macs": count_macs(spec),
        "dataset": data.name,
        "classes": list(data.classes),
        "train_images": len(data.train_x),
        "test_images": len(data.test_x),
        "training": cfg.to_dict(),
        "seed": cfg.seed,
        "test_accuracy": last.val_acc,
        "test_loss": last.val_loss,
        "epochs": [
            {
                "epoch": s.epoch,
                "train_loss": s.train_loss,
                "train_accuracy": s.train_acc,
                "test_loss": s.val_loss,
                "test_accuracy": s.val_acc,
                "lr": s.lr,
                "seconds": s.seconds,
                "images_per_s": s.images_per_s,
            }
            for s in res.history
        ],
        "confusion_matrix": confusion_matrix(data.test_y, res.val_pred, data.num_classes),
        "seconds": res.total_seconds,
        "train_seconds": res.train_seconds,
        "images_per_s": res.images_per_s,
        "device": device_name(device),
        "normalization": {"mean": list(mean), "std": list(std)},
        "versions": versions(),
    }
    return result, res.model


def check_input(spec: ArchSpec, data) -> None:
    """The architecture must take the dataset's images and classes as they are."""
    want = (spec.in_channels, spec.input_size, spec.num_classes)
    have = (data.channels, data.size, data.num_classes)
    if want != have:
        raise ValueError(
            f"the architecture takes {want[0]}x{want[1]}x{want[1]} images and {want[2]} classes, "
            f"but {data.name} has {have[0]}x{have[1]}x{have[1]} and {have[2]}; "
            "use an architecture searched on this dataset, or a preset name, which adapts"
        )


def save_checkpoint(path, model: nn.Module, spec: ArchSpec, result: dict[str, Any]) -> None:
    """Plain tensors and JSON-like values only, so `torch.load(weights_only=True)` works."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(
        {
            "format": "budget-nas-checkpoint/1",
            "architecture": spec.to_dict(),
            "state_dict": state,
            "normalization": result["normalization"],
            "classes": result["classes"],
            "test_accuracy": result["test_accuracy"],
        },
        path,
    )


def load_checkpoint(path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model from a checkpoint (CPU, eval mode)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ArchSpec.from_dict(ckpt["architecture"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def _parse_args(argv: list[str] | None):
    from search.cli import Parser

    ap = Parser(
        prog="python -m search.train",
        description="Train one architecture on the whole training set and report test accuracy.",
    )
    ap.add_argument(
        "arch",
        help="architecture JSON (bare or an exported best.json), "
        "or a preset name from models/presets.py",
    )
    ap.add_argument(
        "--dataset",
        help="cifar10, fashion-mnist, folder:PATH or synthetic "
        "(default: the export's dataset, else cifar10)",
    )
    ap.add_argument("--data-dir", help="where datasets live (default $NAS_DATA_DIR or ./data)")
    ap.add_argument("--epochs", type=int, help="default: 30, or the export's")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("-o", "--out", help="output folder (default runs/<arch>-<dataset>-<time>)")
    for name, kind in [
        ("batch-size", int),
        ("lr", float),
        ("weight-decay", float),
        ("label-smoothing", float),
        ("cutout", int),
        ("seed", int),
        ("warmup", float),
    ]:
        ap.add_argument(
            f"--{name}",
            type=kind,
            help="default: the export's setting, else "
            f"{getattr(TrainConfig, name.replace('-', '_'))}",
        )
    ap.add_argument("--optimizer", choices=OPTIMIZERS)
    ap.add_argument("--schedule", choices=SCHEDULES)
    return ap.parse_args(argv)


def _resolve(args) -> tuple[ArchSpec | str, TrainConfig, str]:
    """Architecture (or preset name), settings and dataset from the file and flags."""
    import json
    from pathlib import Path

    from models import load_arch
    from models.presets import PRESETS

    saved: dict[str, Any] = {}
    if args.arch in PRESETS and not Path(args.arch).exists():
        arch: ArchSpec | str = args.arch
    elif not Path(args.arch).exists():
        raise ValueError(f"{args.arch}: no such file, and not a preset ({', '.join(PRESETS)})")
    else:
        arch = load_arch(args.arch)
        data = json.loads(Path(args.arch).read_text())
        saved = data if isinstance(data, dict) and "architecture" in data else {}
    settings = dict(saved.get("training", {}))
    settings["epochs"] = args.epochs if args.epochs is not None else 30
    for key in (
        "batch_size",
        "lr",
        "weight_decay",
        "label_smoothing",
        "cutout",
        "seed",
        "warmup",
        "optimizer",
        "schedule",
    ):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    dataset = args.dataset or saved.get("dataset") or "cifar10"
    return arch, TrainConfig.from_dict(settings), dataset


def main(argv: list[str] | None = None) -> int:
    import sys
    from pathlib import Path

    from models import count_params
    from models.presets import preset
    from search.data import DataError, load_dataset
    from search.export import write_json

    args = _parse_args(argv)
    try:
        arch, cfg, dataset = _resolve(args)
        device = resolve_device(args.device)
        data = load_dataset(dataset, args.data_dir)
        spec = (
            arch
            if isinstance(arch, ArchSpec)
            else preset(arch, data.channels, data.size, data.num_classes)
        )
        check_input(spec, data)
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.arch if isinstance(arch, str) else Path(args.arch).stem
    out = Path(
        args.out
        or f"runs/{name}-{dataset.replace(':', '_').replace('/', '_')}-"
        f"{time.strftime('%Y%m%d-%H%M%S')}"
    )
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"training {name} ({count_params(spec):,} params) on {data.name}: "
        f"{len(data.train_x):,} train / {len(data.test_x):,} test images, {cfg.epochs} epochs, "
        f"{cfg.optimizer} lr {cfg.lr:g}, batch {cfg.batch_size}, device {device}",
        flush=True,
    )

    def progress(s: EpochStats, _model: nn.Module) -> None:
        print(
            f"epoch {s.epoch:3d}/{cfg.epochs}  loss {s.train_loss:.4f}  "
            f"train {100 * s.train_acc:5.2f}%  test {100 * s.val_acc:5.2f}%  "
            f"{s.seconds:6.1f}s  {s.images_per_s:8,.0f} img/s",
            flush=True,
        )

    try:
        result, model = final_training(spec, cfg, data, device, progress)
    except (TrainingDiverged, OutOfMemory) as e:
        print(f"error: {e}; lower --lr or --batch-size", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: nothing written", file=sys.stderr)
        return 130
    save_checkpoint(out / "model.pt", model, spec, result)
    result["checkpoint"] = str(out / "model.pt")
    write_json(out / "result.json", result)
    print(
        f"test accuracy {100 * result['test_accuracy']:.2f}% in {result['seconds']:.0f}s "
        f"({result['images_per_s']:,.0f} img/s on {result['device']})"
    )
    print(f"wrote {out / 'result.json'} and {out / 'model.pt'}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

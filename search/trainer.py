"""The trainer: whole splits on the device as uint8, batched augmentation, no DataLoader.

`train()` serves the search trials and the final training alike. Its length is
a number of training images seen (`TrainConfig.images`), not epochs, so a
1,800-image folder and 60,000-image Fashion-MNIST both give a candidate enough
optimizer steps; validation runs at fixed fractions of that length (rungs),
which is where the search reports to the pruner and the final training ends
its epochs.
"""

from __future__ import annotations

import copy
import gc
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from models import ArchSpec, build_model
from models.resnet import BasicBlock
from search.data import Split, augment

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine")


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the weights are useless from here on."""


class OutOfMemory(Exception):
    """The device ran out of memory for this model and batch size."""


class Stopped(Exception):
    """A stop was asked for (Ctrl-C, SIGTERM) while training; the run is not finished."""


@dataclass(frozen=True)
class TrainConfig:
    """Training settings: the search samples some, the recipe fixes the rest.

    The recipe parts (`ema`, `tta`, `zero_init`, `bn_lr`) default to what
    benchmarks/trial_recipe.py measured to help; see its result file.
    """

    images: int = 1_500_000  # training images seen in all: epochs x split size
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
    # The recipe: each part on or off as benchmarks/trial_recipe measured it on the quick
    # profile (benchmarks/README.md#trial-recipe): the weight average and BatchNorm's higher
    # learning rate help short trials; flip TTA, zero-init residuals and a shorter warmup
    # hurt them.
    ema: float = 0.05  # evaluate an EMA of the weights over this fraction of all steps; 0: off
    tta: bool = False  # evaluate on each image and its mirror image
    zero_init: bool = False  # each block's last BatchNorm starts at zero: blocks start as identity
    bn_lr: float = 3.0  # learning-rate multiplier of BatchNorm and bias parameters
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.images >= 1, "images", ">= 1"),
            (self.batch_size >= 2, "batch_size", ">= 2"),
            (self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}"),
            (self.lr > 0 and math.isfinite(self.lr), "lr", "a positive number"),
            (self.weight_decay >= 0, "weight_decay", ">= 0"),
            (0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)"),
            (self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}"),
            (0 <= self.warmup < 1, "warmup", "in [0, 1)"),
            (self.crop_padding >= 0, "crop_padding", ">= 0"),
            (self.cutout >= 0, "cutout", ">= 0"),
            (0 <= self.ema < 1, "ema", "in [0, 1)"),
            (self.bn_lr > 0, "bn_lr", "> 0"),
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
class EvalStats:
    """One rung: what the run looked like after `images` training images."""

    rung: int  # 1-based
    images: int  # nominal images seen: the rung's fraction of TrainConfig.images
    step: int
    train_loss: float  # mean over the steps since the last rung
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    lr: float
    seconds: float  # training steps since the last rung, without evaluation
    images_per_s: float


@dataclass
class TrainResult:
    model: nn.Module  # the evaluated weights (the EMA when the recipe has one)
    history: list[EvalStats] = field(default_factory=list)
    train_seconds: float = 0.0  # training steps only
    total_seconds: float = 0.0  # with evaluation and setup
    images_per_s: float = 0.0  # training images per second of training steps
    device: str = "cpu"
    val_pred: torch.Tensor | None = None  # predictions of the last validation pass
    graphed: bool = False  # the model's forward and backward ran as CUDA graphs
    graph_error: str | None = None  # why capturing them failed (the run went on eager)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, fused: bool | None = None
) -> torch.optim.Optimizer:
    """Weight decay on conv and linear weights only; BatchNorm and biases at `bn_lr` x lr.

    `fused` (one kernel for the whole update) defaults to on for CUDA; torch has it
    on the CPU too, which is how the tests run that branch.
    """
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr * cfg.bn_lr},
    ]
    if fused is None:
        fused = next(model.parameters()).is_cuda
    kw = {"fused": True} if fused else {}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **kw)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, **kw)


class Normalize:
    """uint8 batch -> normalised float in the model's memory format."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        memory_format: torch.memory_format = torch.channels_last,
    ) -> None:
        std_t = torch.tensor(std, device=device)
        self.scale = (1 / (255 * std_t)).view(1, -1, 1, 1)
        self.shift = (torch.tensor(mean, device=device) / std_t).view(1, -1, 1, 1)
        self.memory_format = memory_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(memory_format=self.memory_format).float()
        return x.mul_(self.scale).sub_(self.shift)


def autocast(device: torch.device, bf16: bool | None = None, cache: bool = True) -> torch.autocast:
    """bf16 autocast, by default on CUDA only (BatchNorm keeps fp32 weights and statistics
    under it); `bf16=True` runs that branch on the CPU. One object serves a whole run:
    building it checks the device's bf16 support each time. CUDA graphs need `cache` off
    (the cast weights would be graph memory that a replay does not refresh)."""
    on = device.type == "cuda" if bf16 is None else bf16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on, cache_enabled=cache)


def graph_model(model: nn.Module, sample: torch.Tensor, amp: torch.autocast) -> str | None:
    """Capture the model's training forward and backward as two CUDA graphs
    (`torch.cuda.make_graphed_callables`): a small network's step is a few hundred
    kernels of microseconds each, so launching them costs more than running them
    (benchmarks/README.md#gpu-check). Eval mode still runs eager, as do the
    augmentation, loss and the fused optimizer (a few dozen launches). Capturing runs
    the model 4 times on `sample`; the BatchNorm statistics that moves are put back.
    Returns None, or why capturing failed (the model is then left as it was)."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        with amp:
            torch.cuda.make_graphed_callables(model, (sample,))
        return None
    except Exception as e:  # an op that cannot be captured: the run goes on eager
        model.__dict__.pop("forward", None)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        torch.cuda.synchronize(sample.device)
        with torch.no_grad():
            torch._foreach_copy_(list(model.buffers()), saved)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: Normalize,
    tta: bool = False,
    batch_size: int = 1024,
    amp: torch.autocast | None = None,
    fixed_shape: bool | None = None,
) -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy, predictions on the device) over a uint8 split on the device.

    With `tta`, the logits of each image and its mirror image are averaged.
    `fixed_shape` (default: on CUDA) pads the ragged last batch to `batch_size`,
    so that cudnn.benchmark tunes one evaluation shape per model, not two.
    """
    was_training = model.training
    model.eval()
    if fixed_shape is None:
        fixed_shape = x.is_cuda
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    preds = []
    with amp or autocast(x.device):
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            n = len(xb)
            if fixed_shape and n < batch_size < len(x):
                xb = torch.cat([xb, xb.new_zeros((batch_size - n, *xb.shape[1:]))])
            xb = norm(xb)
            out = model(xb).float()
            if tta:
                out = (out + model(xb.flip(3)).float()) / 2
            out = out[:n]
            loss_sum += nn.functional.cross_entropy(out, yb, reduction="sum")
            preds.append(out.argmax(1))
    model.train(was_training)
    pred = torch.cat(preds)
    return loss_sum.item() / len(y), (pred == y).float().mean().item(), pred


class WeightAverage:
    """An exponential moving average of the weights: the copy that gets evaluated.

    The decay ramps up from 0 so the random initial weights fade out quickly.
    BatchNorm statistics are copied from the trained model, not averaged:
    averaging them (AveragedModel's use_buffers) cost accuracy and made early rungs
    rank worse (benchmarks/README.md#trial-recipe). Not AveragedModel for the rest
    either: it copies its CPU step counter to the device on every update, a
    blocking copy, so a GPU would wait each step; here the tensors are listed once
    and a step is two foreach kernels.
    """

    def __init__(self, model: nn.Module, horizon_steps: float) -> None:
        self.model = copy.deepcopy(model)
        self.max_decay = 1 - 1 / max(1.0, horizon_steps)
        self.weights = [[p.detach() for p in self.model.parameters()],
                        [p.detach() for p in model.parameters()]]  # fmt: skip
        self.buffers = [list(self.model.buffers()), list(model.buffers())]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (0-based)."""
        decay = min(self.max_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(*self.weights, 1 - decay)
        if self.buffers[0]:
            torch._foreach_copy_(*self.buffers)


def lr_schedule(
    opt: torch.optim.Optimizer, total: int, warmup: int, schedule: str
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over `warmup` steps to the peak, then linear (onecycle) or cosine
    decay to zero at `total`, stepped once per optimizer step."""
    decay_steps = max(1, total - warmup)
    decay = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=decay_steps)
        if schedule == "cosine"
        else torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=decay_steps)
    )
    if warmup < 1:
        return decay
    # start_factor 1/warmup over warmup - 1 steps: (step + 1) / warmup at every step
    rise = torch.optim.lr_scheduler.LinearLR(opt, 1 / warmup, 1.0, total_iters=warmup - 1)
    return torch.optim.lr_scheduler.SequentialLR(opt, [rise, decay], milestones=[warmup])


def rung_steps(total: int, rungs: Sequence[float]) -> list[int]:
    """The step after which each rung's validation runs (the last rung is the end)."""
    if not rungs or any(not 0 < f <= 1 for f in rungs) or list(rungs) != sorted(set(rungs)):
        raise ValueError(f"rungs must be increasing fractions in (0, 1], got {list(rungs)}")
    return [max(1, round(f * total)) for f in rungs]


def train(
    spec: ArchSpec,
    cfg: TrainConfig,
    split: Split,
    *,
    device: torch.device | str = "cpu",
    rungs: Sequence[float] = (1.0,),
    on_eval: Callable[[EvalStats], None] | None = None,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    stop: threading.Event | None = None,
    bf16: bool | None = None,
    graphs: bool | None = None,
) -> TrainResult:
    """Train `spec` from scratch for `cfg.images` images of `split`, evaluating at each
    rung on its evaluation images (if any).

    `on_eval` sees every rung and may raise to end the run (a pruned trial);
    `on_step(step, total, loss)` follows every step; a set `stop` ends it with
    Stopped. Raises TrainingDiverged on a NaN/inf loss and OutOfMemory when
    the device cannot hold the model and batch, after freeing what it held.
    `bf16`: autocast to bfloat16; default on CUDA only. `graphs`: the model's forward
    and backward as CUDA graphs (`graph_model`); default on CUDA, impossible elsewhere.
    """
    device = torch.device(device)
    if graphs and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
    run = None
    try:
        run = _Run(spec, cfg, split, device, bf16, graphs)
        return run.train(rungs, on_eval, on_step, stop)
    except torch.OutOfMemoryError as e:
        message = str(e).splitlines()[0] if str(e) else "out of memory"
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        message = str(e).splitlines()[0]
    finally:  # the model as built: eager forward, no graph memory held, picklable
        if run is not None:
            run.model.__dict__.pop("forward", None)
            graphed, run = run.graphs, None
            if graphed:  # the graphs and their memory pool sit in reference cycles: free
                gc.collect()  # them now (a worker runs trial after trial; a forked child
                # must not inherit them), not at the next full collection
    # Outside the except block: the traceback, and the model its frames held, are gone.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    raise OutOfMemory(f"out of memory on {device} at batch size {cfg.batch_size}: {message}")


def initial_model(spec: ArchSpec, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The model as training starts: seeded weights, channels_last, the recipe's init."""
    torch.manual_seed(cfg.seed)
    # channels_last feeds Tensor Cores on CUDA, and is faster on the CPU too
    # (benchmarks/README.md#throughput).
    model = build_model(spec).to(device, memory_format=torch.channels_last)
    if cfg.zero_init:
        for m in model.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.body[-1].weight)
    return model


# Memory pressure that is not torch.OutOfMemoryError: the CPU allocator's failure, and
# cuDNN / cuBLAS failing to get workspace (often how a full GPU shows up in a conv).
OUT_OF_MEMORY_MARKS = (
    "can't allocate memory",
    "CUDNN_STATUS_ALLOC_FAILED",
    "Unable to find a valid cuDNN algorithm",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDA out of memory",
)


def is_out_of_memory(e: RuntimeError) -> bool:
    return any(mark in str(e) for mark in OUT_OF_MEMORY_MARKS)


class _Run:
    """One training run's state; `train()` is the loop."""

    def __init__(
        self,
        spec: ArchSpec,
        cfg: TrainConfig,
        split: Split,
        device: torch.device,
        bf16: bool | None = None,
        graphs: bool | None = None,
    ) -> None:
        self.start = time.perf_counter()
        self.cfg, self.device = cfg, device
        self.graphs = device.type == "cuda" if graphs is None else graphs
        self.amp = autocast(device, bf16, cache=not self.graphs)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.model = initial_model(spec, cfg, device)
        self.norm = Normalize(split.mean, split.std, device)
        self.x, self.y = split.train_x.to(device), split.train_y.to(device)
        self.val = None
        if split.eval_x is not None and split.eval_y is not None:
            self.val = (split.eval_x.to(device), split.eval_y.to(device))
        self.g = torch.Generator(device=device).manual_seed(cfg.seed)
        self.bs = min(cfg.batch_size, len(self.x))
        self.total = max(1, cfg.images // self.bs)
        self.opt = make_optimizer(self.model, cfg)
        warmup = round(cfg.warmup * self.total)
        self.sched = lr_schedule(self.opt, self.total, warmup, cfg.schedule)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.ema = WeightAverage(self.model, cfg.ema * self.total) if cfg.ema else None
        self.order, self.pos = torch.empty(0, dtype=torch.long), 0
        self.graph_error = None
        if self.graphs:  # after the weight average's copy: that one stays a plain module
            self.graph_error = graph_model(self.model, self.sample(), self.amp)
            self.graphs = self.graph_error is None

    def sample(self) -> torch.Tensor:
        """A normalised batch of the training shape and memory format, of noise drawn
        from its own generator (the run's stays where it was)."""
        g = torch.Generator(device=self.device).manual_seed(0)
        shape = (self.bs, *self.x.shape[1:])
        noise = torch.randint(0, 256, shape, generator=g, device=self.device, dtype=torch.uint8)
        return self.norm(noise)

    def batch_indices(self) -> torch.Tensor:
        """Passes over the split in a fresh seeded order; each pass drops its ragged tail
        (BatchNorm hates tiny batches)."""
        if self.pos + self.bs > len(self.order):
            self.order = torch.randperm(len(self.x), device=self.device, generator=self.g)
            self.pos = 0
        self.pos += self.bs
        return self.order[self.pos - self.bs : self.pos]

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.batch_indices()
        cfg = self.cfg
        xb = augment(self.x[idx], self.g, cfg.crop_padding, cfg.flip, cfg.cutout)
        yb = self.y[idx]
        with self.amp:
            out = self.model(self.norm(xb))
            loss = self.criterion(out.float(), yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return loss.detach(), (out.argmax(1) == yb).sum()

    def train(
        self,
        rungs: Sequence[float],
        on_eval: Callable[[EvalStats], None] | None,
        on_step: Callable[[int, int, torch.Tensor], None] | None,
        stop: threading.Event | None,
    ) -> TrainResult:
        self.model.train()
        result = TrainResult(model=self.model, device=str(self.device))
        ends = rung_steps(self.total, rungs)
        step = 0
        for rung, (frac, end) in enumerate(zip(rungs, ends, strict=True), 1):
            t0, first = time.perf_counter(), step
            loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
            correct = torch.zeros((), device=self.device, dtype=torch.int64)
            lr = self.opt.param_groups[0]["lr"]
            while step < end:
                if stop is not None and stop.is_set():
                    raise Stopped(f"stopped at step {step} of {self.total}")
                loss, right = self.step()
                if self.ema is not None:
                    self.ema.update(step)
                step += 1
                loss_sum += loss
                correct += right
                if on_step is not None:
                    on_step(step, self.total, loss)
                if step % 50 == 0 and not torch.isfinite(loss_sum):
                    break
            result.history.append(
                self.finish_rung(rung, frac, step, first, t0, lr, loss_sum, correct)
            )
            result.train_seconds += result.history[-1].seconds
            if self.val is not None:
                result.val_pred = self.last_pred
            if on_eval is not None:
                on_eval(result.history[-1])
        result.graphed, result.graph_error = self.graphs, self.graph_error
        result.model = self.ema.model if self.ema is not None else self.model
        result.images_per_s = self.total * self.bs / max(result.train_seconds, 1e-9)
        result.total_seconds = time.perf_counter() - self.start
        return result

    def finish_rung(
        self,
        rung: int,
        frac: float,
        step: int,
        first: int,
        t0: float,
        lr: float,
        loss_sum: torch.Tensor,
        correct: torch.Tensor,
    ) -> EvalStats:
        seen = (step - first) * self.bs
        train_loss = loss_sum.item() / max(1, step - first)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"loss became {train_loss} by step {step} of {self.total} (lr {lr:.3g})"
            )
        val_loss = val_acc = None
        if self.val is not None:
            model = self.ema.model if self.ema is not None else self.model
            val_loss, val_acc, self.last_pred = evaluate(
                model, *self.val, self.norm, tta=self.cfg.tta, amp=self.amp
            )
        return EvalStats(
            rung=rung,
            images=round(frac * self.cfg.images),
            step=step,
            train_loss=train_loss,
            train_acc=correct.item() / max(1, seen),
            val_loss=val_loss,
            val_acc=val_acc,
            lr=lr,
            seconds=seconds,
            images_per_s=seen / max(seconds, 1e-9),
        )

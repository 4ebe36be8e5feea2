"""The one trainer both methods use: config, checkpoints, exact resume, ranks, metrics, loss plot.

A method supplies its model and a ``loss_step(step, micro_step) -> dict`` that draws the
micro-batch of (step, micro_step) itself (from generators seeded by them, so a resumed run
sees the batches the uninterrupted run saw) and returns its losses, the tensor to
backpropagate under ``"loss"``. Everything else lives here, once:

- AdamW over the parameters that require grad; linear warm-up, then constant or linear decay;
  gradient accumulation; gradient-norm clipping.
- Ranks (``torchrun``): gradients of replicated parameters are averaged by one coalesced
  all-reduce per dtype after accumulation (DDP's arithmetic without its model wrapper, so a
  method may call any method of its model); FSDP2 shards the modules the method names, which
  reduce-scatter their own gradients. Checkpoints hold full tensors either way.
- Run directory: ``checkpoint_{step:08d}.pt`` (the last two kept: a latest one that cannot be
  read falls back to the previous with a warning), ``metrics.jsonl`` (appended one row per
  logged step; a cut last line is dropped on resume), ``loss.png``. Every file but the
  append-only metrics is written to a temporary name and renamed, so a kill at any point
  leaves the previous complete file; the next run removes the temporaries a kill left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn

from mkfast.config import check_choice, check_positive
from mkfast.distributed import (
    clip_grad_norm,
    full_training_state,
    fully_shard_units,
    is_sharded,
    load_full_training_state,
    rank_and_world_size,
)
from mkfast.files import (  # noqa: F401  (fault_hook, atomic_torch_save: this module's interface too)
    TEMPORARY_SUFFIX,
    atomic_torch_save,
    atomic_write,
    atomic_write_text,
    fault_hook,
    fault_point,
    remove_temporaries,
)
from mkfast.progress import progress_bar

CHECKPOINT_PATTERN = "checkpoint_{step:08d}.pt"
CHECKPOINT_RE = re.compile(r"checkpoint_(\d{8})\.pt$")
# What MKS2 runs wrote before both methods shared this layout: one file, overwritten.
LEGACY_CHECKPOINT = "checkpoint.pt"
# The newest is read first; the one before it is the fallback when the newest cannot be read.
CHECKPOINTS_KEPT = 2
CHECKPOINT_FORMAT = 2
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
SCHEDULES = ("constant", "linear")
# Metric keys that are not losses, left out of the loss plot.
NOT_LOSSES = ("stage", "step", "learning_rate", "grad_norm", "retrieved_tokens")


@dataclass
class TrainingConfig:
    """What the shared trainer reads; each method's config extends it with its data fields."""

    output_dir: str = "run"
    steps: int = 100
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "constant"  # after warm-up: "constant", or "linear" decay to 0 at ``steps``
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0  # 0: no clipping
    checkpoint_every: int = 50
    log_every: int = 1
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        check_positive(self, "steps", "checkpoint_every", "gradient_accumulation", "log_every")
        check_positive(self, "warmup_steps", "weight_decay", "max_grad_norm", strict=False)
        check_positive(self, "learning_rate")
        check_choice(self, "schedule", SCHEDULES)


# ---------------------------------------------------------------------- metrics
def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics.jsonl; a last line cut by a kill mid-append is dropped with a warning."""
    with open(path) as handle:
        lines = handle.read().split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number != len(lines):  # a complete line (newline-terminated) that is not JSON
                raise ValueError(f"{path}: line {number} is not JSON ({error})") from None
            warnings.warn(f"{path}: dropping its last line, cut by an interrupted write", stacklevel=2)
    return rows


def append_metrics(path: str, row: dict) -> None:
    # Append only: a kill can cut this line, never erase an earlier one.
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def keep_metrics_before(path: str, step: int, step_offset: int = 0) -> None:
    """Rewrite ``path`` atomically with the rows of steps < ``step`` (the ones a resume does not redo)."""
    rows = read_metrics(path)
    for row in rows:
        row["step"] += step_offset
    kept = "".join(json.dumps(row) + "\n" for row in rows if row["step"] < step)
    atomic_write_text(path, kept, point="metrics_rewrite")


# ---------------------------------------------------------------------- checkpoints
def checkpoint_paths(output_dir: str) -> list[str]:
    """This layout's checkpoints of ``output_dir``, oldest first."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return [os.path.join(output_dir, name) for name in sorted(names) if CHECKPOINT_RE.match(name)]


def latest_checkpoint(output_dir: str) -> str | None:
    paths = checkpoint_paths(output_dir)
    return paths[-1] if paths else None


def _read_checkpoint(path: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError("not a training checkpoint (no step)")
    if "trainable" in state:  # the legacy MKS2 layout: the trained tensors under another key
        state["model"] = state.pop("trainable")
    return state


def load_latest_checkpoint(output_dir: str) -> tuple[str, dict] | None:
    """(path, state) of the newest readable checkpoint; None when there is none.

    One that cannot be read (a write cut by a full disk, a copy cut short) is skipped with a
    warning for the one before it; when none can be read the error names them all.
    """
    paths = checkpoint_paths(output_dir)
    if not paths and os.path.exists(os.path.join(output_dir, LEGACY_CHECKPOINT)):
        paths = [os.path.join(output_dir, LEGACY_CHECKPOINT)]
    failures = []
    for path in reversed(paths):
        try:
            return path, _read_checkpoint(path)
        except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError... for a cut file
            failures.append(f"{path}: {error}")
            warnings.warn(f"checkpoint {path} cannot be read ({error}); trying the previous one",
                          stacklevel=2)
    if failures:
        raise ValueError(f"no checkpoint in {output_dir} can be read: " + "; ".join(failures))
    return None


def save_checkpoint(output_dir: str, state: dict) -> str:
    path = os.path.join(output_dir, CHECKPOINT_PATTERN.format(step=state["step"]))
    atomic_torch_save(state, path, point="checkpoint_written")
    for old in checkpoint_paths(output_dir)[:-CHECKPOINTS_KEPT]:
        os.remove(old)
    with contextlib.suppress(FileNotFoundError):  # superseded: the new layout's checkpoint is read first
        os.remove(os.path.join(output_dir, LEGACY_CHECKPOINT))
    return path


# ---------------------------------------------------------------------- plot
def plot_losses(metrics_paths: str | dict[str, str], output_path: str, title: str = "",
                keys: tuple[str, ...] | None = None, labels: dict[str, str] | None = None) -> None:
    """The losses (``keys``, default every loss logged) of one or several metrics files (run -> path)
    against the step, to a PNG.

    ``labels`` renames keys in the legend; a key whose values repeat an earlier key's (the
    RA-CM3 total without retrieved tokens is its main loss) is not drawn twice.
    """
    from mkfast.plotting import pyplot

    plt = pyplot()
    if plt is None:
        return
    if isinstance(metrics_paths, str):
        metrics_paths = {"": metrics_paths}
    labels = labels or {}
    figure, axis = plt.subplots(figsize=(7, 4))
    for run, path in metrics_paths.items():
        if not os.path.exists(path):
            continue
        rows = read_metrics(path)
        drawn = []
        logged = dict.fromkeys(key for row in rows for key in row if key not in NOT_LOSSES)
        for key in keys or logged:
            points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
            if not points or points in drawn:
                continue
            drawn.append(points)
            label = f"{run} {labels.get(key, key)}" if run else labels.get(key, key)
            axis.plot([step for step, _ in points], [value for _, value in points], label=label)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(output_path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    plt.close(figure)


# ---------------------------------------------------------------------- trainer
def learning_rate_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "linear") -> float:
    """Linear warm-up to 1, then constant or linear decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


LossStep = Callable[[int, int], dict]


class Trainer:
    """Trains the parameters of ``model`` that require grad with ``loss_step`` (see the module doc).

    fsdp_units: modules to shard with FSDP2 when there are ranks (innermost first); None: replicate.
    """

    plot_keys: tuple[str, ...] | None = None  # the losses loss.png shows (None: all)
    plot_labels: dict[str, str] = {}

    def __init__(self, model: nn.Module, loss_step: LossStep, config: TrainingConfig, stage: str = "train",
                 fsdp_units: list[nn.Module] | None = None):
        self.model, self.loss_step, self.config, self.stage = model, loss_step, config, stage
        self.rank, self.world_size = rank_and_world_size()
        if fsdp_units and self.world_size > 1:
            fully_shard_units(fsdp_units)  # before the optimizer: it replaces the parameters
        self.named_trainable = [(name, parameter) for name, parameter in model.named_parameters()
                                if parameter.requires_grad]
        if not self.named_trainable:
            raise ValueError("Trainer: the model has no trainable parameter")
        self.frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
        self.optimizer = torch.optim.AdamW([parameter for _, parameter in self.named_trainable],
                                           lr=config.learning_rate, betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: learning_rate_factor(
            step, config.warmup_steps, config.steps, config.schedule))
        self.step = 0
        self.metrics_path = os.path.join(config.output_dir, METRICS_FILE)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> str | None:
        """Every rank calls this (gathering shards is collective); rank 0 writes, atomically."""
        model_state, optimizer_state = full_training_state(self.model, self.optimizer)
        if self.rank != 0:
            return None
        # Frozen weights are rebuilt from the method's seed or checkpoint; only what trains is saved.
        state = {"format": CHECKPOINT_FORMAT, "step": self.step, "stage": self.stage,
                 "model": {name: tensor for name, tensor in model_state.items() if name not in self.frozen},
                 "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                 "config": asdict(self.config)}
        return save_checkpoint(self.config.output_dir, state)

    def resume(self) -> bool:
        """Load the newest readable checkpoint of output_dir, if any; True when resumed."""
        found = load_latest_checkpoint(self.config.output_dir)
        if found is None:
            return False
        path, state = found
        missing = {name for name, _ in self.named_trainable} - set(state["model"])
        if missing:
            raise ValueError(f"Trainer.resume: {path} does not hold {len(missing)} of the parameters this "
                             f"model trains (e.g. {sorted(missing)[0]}): a run of another model or stage")
        load_full_training_state(self.model, self.optimizer, state["model"], state["optimizer"],
                                 strict=not self.frozen)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        if self.rank == 0 and os.path.exists(self.metrics_path):
            # Rows after the checkpoint are logged again by this run. Legacy MKS2 rows counted from 1.
            legacy = path.endswith(LEGACY_CHECKPOINT)
            keep_metrics_before(self.metrics_path, self.step, step_offset=-1 if legacy else 0)
        return True

    def _start_fresh(self) -> None:
        """A run that does not resume: what an earlier run left in output_dir goes."""
        for path in [self.metrics_path, *checkpoint_paths(self.config.output_dir),
                     os.path.join(self.config.output_dir, LEGACY_CHECKPOINT)]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)

    # ------------------------------------------------------------------ steps
    def _average_gradients(self) -> None:
        if self.world_size == 1:
            return
        replicated = [parameter for _, parameter in self.named_trainable if not is_sharded(parameter)]
        for parameter in replicated:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        by_dtype: dict[tuple, list[torch.Tensor]] = {}
        for parameter in replicated:
            by_dtype.setdefault((parameter.grad.dtype, parameter.grad.device), []).append(parameter.grad)
        for gradients in by_dtype.values():
            flat = torch._utils._flatten_dense_tensors(gradients)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world_size
            averaged_gradients = torch._utils._unflatten_dense_tensors(flat, gradients)
            for gradient, averaged in zip(gradients, averaged_gradients, strict=True):
                gradient.copy_(averaged)

    def train_step(self) -> dict[str, float]:
        """One optimizer update over ``gradient_accumulation`` micro-batches; returns the averaged metrics."""
        accumulation = self.config.gradient_accumulation
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro_step in range(accumulation):
            losses = self.loss_step(self.step, micro_step)
            if "loss" not in losses:
                raise ValueError(f"Trainer: the loss step returned {sorted(losses)}, without a 'loss'")
            (losses["loss"] / accumulation if accumulation > 1 else losses["loss"]).backward()
            for key, value in losses.items():
                value = value.detach() if isinstance(value, torch.Tensor) else value
                totals[key] = totals.get(key, 0.0) + float(value) / accumulation
        self._average_gradients()
        if self.config.max_grad_norm > 0:
            totals["grad_norm"] = clip_grad_norm([parameter for _, parameter in self.named_trainable],
                                                 self.config.max_grad_norm)
        totals["learning_rate"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return totals

    def train(self, resume: bool = True) -> list[dict]:
        """Run up to config.steps; returns this call's rows ({"stage", "step", metrics...})."""
        config = self.config
        if self.rank == 0:
            os.makedirs(config.output_dir, exist_ok=True)
            remove_temporaries(config.output_dir)
        if not (resume and self.resume()) and self.rank == 0:
            self._start_fresh()
        rows = []
        progress = progress_bar(total=config.steps, initial=self.step, desc=self.stage,
                                enabled=config.progress and self.rank == 0)
        while self.step < config.steps:
            row = {"stage": self.stage, "step": self.step} | self.train_step()
            rows.append(row)
            if self.rank == 0 and row["step"] % config.log_every == 0:
                append_metrics(self.metrics_path, row)
            progress.update(1)
            progress.set_postfix(loss=f"{row['loss']:.3f}")
            if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                self.save_checkpoint()
        progress.close()
        if self.rank == 0 and os.path.exists(self.metrics_path):
            plot_losses(self.metrics_path, os.path.join(config.output_dir, PLOT_FILE), self.stage,
                        self.plot_keys, self.plot_labels)
        return rows


def config_fields(config, target_class):
    """The fields of ``config`` that ``target_class`` also has, as keyword arguments (a method's flat
    command config -> the shared TrainingConfig)."""
    names = {item.name for item in dataclasses.fields(target_class)}
    return {name: getattr(config, name) for name in names if hasattr(config, name)}

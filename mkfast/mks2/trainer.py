"""A small trainer for both MKS2 stages: Adam with warm-up, accumulation, checkpoint/resume, tqdm, JSONL, plot.

Single process, or one process per rank under ``torchrun`` (any backend; gloo on
CPU): every rank draws its own batches, and gradients of the trainable parameters
are averaged over ranks before each update. By default every rank holds the whole
model and the (small) trainable part is all-reduced, DDP without buckets; with
``fsdp_units`` the given modules (the language model's layers) are sharded by FSDP2,
which averages their gradients itself, for a Llama that does not fit on one device.
Batches are drawn from a generator seeded by (seed, step, rank), so a resumed run
sees the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from mkfast.distributed import (
    clip_grad_norm,
    full_training_state,
    fully_shard_units,
    is_sharded,
    load_full_training_state,
    rank_and_world_size,
)

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
# Large primes keep the per-(step, rank) seeds of nearby steps and ranks apart.
STEP_SEED_STRIDE = 1_000_003
RANK_SEED_STRIDE = 7_919


@dataclass
class TrainerConfig:
    """SPEC (MKS2): Adam, lr 1e-4, warm-up; defaults sized for the CPU demo."""

    output_dir: str = "mks2_run"
    steps: int = 100
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0
    progress: bool = True


def plot_losses(metrics_path: str, plot_path: str, title: str = "") -> None:
    """One line per loss key of the JSONL metrics, against the step."""
    from mkfast.plotting import pyplot

    plt = pyplot()
    if plt is None:
        return

    with open(metrics_path) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for key in sorted({key for row in rows for key in row if key not in ("step", "learning_rate", "stage")}):
        points = [(row["step"], row[key]) for row in rows if key in row]
        axis.plot([step for step, _ in points], [value for _, value in points], label=key)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(plot_path, dpi=100)
    plt.close(figure)


class Trainer:
    """Trains the parameters of ``model`` that require grad.

    loss_fn(generator: torch.Generator) -> dict of scalar tensors with a "loss" key: draws
    one micro-batch with ``generator`` and computes its losses.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[torch.Generator], dict], config: TrainerConfig,
                 stage: str = "train", fsdp_units: list[nn.Module] | None = None):
        self.model, self.loss_fn, self.config, self.stage = model, loss_fn, config, stage
        self.rank, self.world_size = rank_and_world_size()
        if fsdp_units and self.world_size > 1:
            fully_shard_units(fsdp_units)  # before the optimizer: it replaces the parameters
        self.named_trainable = [(name, parameter) for name, parameter in model.named_parameters()
                                if parameter.requires_grad]
        if not self.named_trainable:
            raise ValueError("Trainer: the model has no trainable parameter")
        self.optimizer = torch.optim.Adam([parameter for _, parameter in self.named_trainable],
                                          lr=config.learning_rate)
        warmup = max(1, config.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / warmup))
        self.step = 0
        os.makedirs(config.output_dir, exist_ok=True)
        self.checkpoint_path = os.path.join(config.output_dir, CHECKPOINT_NAME)
        self.metrics_path = os.path.join(config.output_dir, METRICS_NAME)

    def save_checkpoint(self) -> None:
        """Trainable tensors (full, also under FSDP2), optimizer and scheduler state, step.

        Every rank calls this (gathering shards is collective); rank 0 writes, atomically.
        """
        model_state, optimizer_state = full_training_state(self.model, self.optimizer)
        if self.rank != 0:
            return
        state = {"step": self.step, "config": asdict(self.config),
                 "trainable": {name: model_state[name] for name, _ in self.named_trainable},
                 "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict()}
        temporary = self.checkpoint_path + ".tmp"
        torch.save(state, temporary)
        os.replace(temporary, self.checkpoint_path)

    def resume(self) -> bool:
        """Load the last checkpoint of output_dir if there is one; True when resumed."""
        if not os.path.exists(self.checkpoint_path):
            return False
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        names = {name for name, _ in self.named_trainable}
        if set(state["trainable"]) != names:
            raise ValueError(f"Trainer.resume: {self.checkpoint_path} holds other parameters than this model trains")
        # Frozen tensors are not in the checkpoint: they stay as they are.
        load_full_training_state(self.model, self.optimizer, state["trainable"], state["optimizer"], strict=False)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        if self.rank == 0 and os.path.exists(self.metrics_path):
            # Drop metrics logged after the checkpoint: the resumed run logs those steps again.
            with open(self.metrics_path) as handle:
                rows = [line for line in handle if line.strip() and json.loads(line)["step"] <= self.step]
            with open(self.metrics_path, "w") as handle:
                handle.writelines(rows)
        return True

    def _average_gradients(self) -> None:
        if self.world_size == 1:
            return
        for _, parameter in self.named_trainable:
            if is_sharded(parameter):
                continue  # FSDP2 reduce-scattered (and averaged) it already
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
            parameter.grad /= self.world_size

    def train_step(self) -> dict[str, float]:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro_step in range(self.config.gradient_accumulation):
            seed = (self.config.seed + STEP_SEED_STRIDE * self.step + RANK_SEED_STRIDE * self.rank
                    + 31 * micro_step)
            losses = self.loss_fn(torch.Generator().manual_seed(seed))
            (losses["loss"] / self.config.gradient_accumulation).backward()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) / self.config.gradient_accumulation
        self._average_gradients()
        if self.config.max_grad_norm > 0:
            clip_grad_norm([parameter for _, parameter in self.named_trainable], self.config.max_grad_norm)
        totals["learning_rate"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return totals

    def train(self, resume: bool = True) -> list[dict]:
        """Run up to config.steps; returns this call's metric rows (also appended to metrics.jsonl)."""
        from tqdm import tqdm

        if not (resume and self.resume()) and self.rank == 0 and os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)  # a fresh run: metrics of an earlier run in this directory go
        rows = []
        progress = tqdm(total=self.config.steps, initial=self.step, desc=self.stage,
                        disable=not self.config.progress or self.rank != 0, leave=False)
        while self.step < self.config.steps:
            metrics = self.train_step()
            row = {"stage": self.stage, "step": self.step} | metrics
            rows.append(row)
            if self.rank == 0:
                with open(self.metrics_path, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}")
            if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
                self.save_checkpoint()
        progress.close()
        if self.rank == 0 and os.path.exists(self.metrics_path):
            plot_losses(self.metrics_path, os.path.join(self.config.output_dir, PLOT_NAME), self.stage)
        return rows

"""MKS2 on the shared trainer (mkfast.training): Adam, lr 1e-4, warm-up, then constant.

``loss_fn(generator) -> dict`` draws one micro-batch with ``generator`` and returns the
stage's losses; the generator of (step, rank, micro-step) is seeded from the run's seed, so a
resumed run sees the batches the uninterrupted run would have seen. Under ``torchrun`` every
rank draws its own batches and the gradients are averaged; ``fsdp_units`` (the language
model's layers) are sharded by FSDP2, for a Llama that does not fit on one device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mkfast import training
from mkfast.training import plot_losses, read_metrics  # noqa: F401  (part of this module's interface)

# Large primes keep the per-(step, rank) seeds of nearby steps and ranks apart.
STEP_SEED_STRIDE = 1_000_003
RANK_SEED_STRIDE = 7_919
MICRO_STEP_SEED_STRIDE = 31


@dataclass
class TrainerConfig(training.TrainingConfig):
    """MKS2: Adam, lr 1e-4, warm-up (docs/methods.md); defaults sized for the CPU demo."""

    output_dir: str = "mks2_run"


class Trainer(training.Trainer):
    """Trains the parameters of ``model`` that require grad with ``loss_fn(generator)``."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[torch.Generator], dict], config: TrainerConfig,
                 stage: str = "train", fsdp_units: list[nn.Module] | None = None):
        super().__init__(model, self._seeded_step, config, stage, fsdp_units)
        self.loss_fn = loss_fn

    def _seeded_step(self, step: int, micro_step: int) -> dict:
        seed = (self.config.seed + STEP_SEED_STRIDE * step + RANK_SEED_STRIDE * self.rank
                + MICRO_STEP_SEED_STRIDE * micro_step)
        return self.loss_fn(torch.Generator().manual_seed(seed))

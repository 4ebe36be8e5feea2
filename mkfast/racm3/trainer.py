"""RA-CM3 generator training on the shared trainer (mkfast.training) (RA-CM3 "Training").

RA-CM3: Adam(0.9, 0.98), peak lr 1e-4 with warm-up then linear decay, grad clip 1.0. Resume
is exact: the batch of step s and every random draw in it (K, query part, query dropout,
masking) come from generators seeded by (seed, s), and the model, optimiser and schedule
states are checkpointed, so a run killed at any point and resumed logs the same losses as an
uninterrupted one.

Under ``torchrun`` every rank builds the same global batch order and trains on its slice of
each batch, with the generator replicated or, with ``fsdp=True``, sharded by FSDP2 layer by
layer. Checkpoints hold full tensors either way, so a run can resume with the other choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mkfast import training
from mkfast.config import check_positive
from mkfast.distributed import llama_fsdp_units
from mkfast.racm3.retrieval import LOSS_ALPHA, RetrievalCorpus, SequenceOptions, retrieval_augmented_loss
from mkfast.training import latest_checkpoint, learning_rate_factor, read_metrics  # noqa: F401  (interface)

PLOT_KEYS = ("main_loss", "loss")
PLOT_LABELS = {"main_loss": "L_main", "loss": "L_main + alpha L_retr"}


@dataclass
class TrainingConfig(training.TrainingConfig):
    output_dir: str = "racm3_run"
    steps: int = 1000
    learning_rate: float = 1e-4  # RA-CM3 peak
    warmup_steps: int = 100
    schedule: str = "linear"
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    checkpoint_every: int = 100
    batch_size: int = 16
    alpha: float = LOSS_ALPHA
    fsdp: bool = False  # under torchrun: shard the generator with FSDP2 instead of replicating it

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "batch_size")
        check_positive(self, "alpha", strict=False)


def batch_example_indices(step: int, batch_size: int, dataset_size: int, seed: int) -> list[int]:
    """Rows of step ``step``'s global batch: consecutive slices of per-epoch permutations of the data."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, dataset_size)
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        permutation = torch.randperm(dataset_size, generator=generator)
        indices.append(int(permutation[offset]))
    return indices


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 1)


class Trainer(training.Trainer):
    """Trains ``model`` (a causal LM over the CM3 vocabulary) on ``corpus`` with RA-CM3's objective."""

    plot_keys, plot_labels = PLOT_KEYS, PLOT_LABELS

    def __init__(self, model: torch.nn.Module, corpus: RetrievalCorpus, config: TrainingConfig,
                 options: SequenceOptions | None = None):
        self.corpus, self.options = corpus, options or SequenceOptions()
        self.device = next(model.parameters()).device
        units = llama_fsdp_units(model) if config.fsdp else None
        super().__init__(model, self.loss_step, config, "racm3", units)

    def _autocast(self):
        # Native bf16 only (sm80+): emulated bf16 would reach Triton kernels that lack it.
        enabled = self.device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def loss_step(self, step: int, micro_step: int) -> dict:
        config = self.config
        # Micro-batches are consecutive global batches: without accumulation, batch s is step s's.
        batch_number = step * config.gradient_accumulation + micro_step
        indices = batch_example_indices(batch_number, config.batch_size, len(self.corpus), config.seed)
        generator = step_generator(config.seed, batch_number)
        # Every rank draws the whole batch's randomness, so draws do not depend on the world size.
        batch = self.corpus.training_batch(indices, self.options, generator)
        local = slice(self.rank, None, self.world_size)
        tensors = (batch.input_ids, batch.attention_mask, batch.labels, batch.target_roles,
                   batch.target_parts)
        batch = type(batch)(*(tensor[local] for tensor in tensors), batch.retrieved[local]).to(self.device)
        with self._autocast():
            # No attention_mask: batches are right-padded, so under the causal mask no real token
            # sees a pad, and pads carry no loss. Without a mask the plain-causal path (the mkfast
            # kernel where registered) runs instead of a 4-D masked SDPA.
            logits = self.model(input_ids=batch.input_ids, use_cache=False).logits
        loss, record = retrieval_augmented_loss(logits, batch, config.alpha)
        return record | {"loss": loss}


def plot_losses(metrics_paths: str | dict[str, str], output_path: str) -> None:
    """Main and total loss per step from one or several metrics.jsonl files (label -> path) to a PNG."""
    training.plot_losses(metrics_paths, output_path, keys=PLOT_KEYS, labels=PLOT_LABELS)

"""RA-CM3 generator training: optimiser, schedule, checkpoints, resume, metrics, DDP (RA-CM3 "Training").

RA-CM3: Adam(0.9, 0.98), peak lr 1e-4 with 1500 warm-up steps then linear
decay, grad clip 1.0. Resume is exact: the batch of step s and every random
draw in it (K, query part, query dropout, masking) come from generators seeded
by (seed, s), and the model, optimiser and schedule states are checkpointed, so
a run killed at any point and resumed logs the same losses as an uninterrupted one.

Single process, or under ``torchrun`` (gloo on CPU, nccl on GPU): every rank
builds the same global batch order and trains on its slice of each batch, with
the model replicated (DDP) or, with ``fsdp=True``, sharded by FSDP2 layer by layer
for models whose weights, gradients and Adam state do not fit on one device.
Checkpoints hold full tensors either way, so a run can resume with the other choice.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass

import torch

from mkfast.distributed import (
    clip_grad_norm,
    full_training_state,
    fully_shard_units,
    llama_fsdp_units,
    load_full_training_state,
    rank_and_world_size,
)
from mkfast.racm3.retrieval import LOSS_ALPHA, RetrievalCorpus, SequenceOptions, retrieval_augmented_loss

CHECKPOINT_PATTERN = "checkpoint_{step:08d}.pt"
# Older checkpoints are deleted after a new one is written; keep two in case the last write was cut.
CHECKPOINTS_KEPT = 2


@dataclass
class TrainingConfig:
    steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 1e-4  # RA-CM3 peak
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    alpha: float = LOSS_ALPHA
    checkpoint_every: int = 100
    log_every: int = 1
    seed: int = 0
    output_dir: str = "racm3_run"
    progress: bool = True
    fsdp: bool = False  # under torchrun: shard the generator with FSDP2 instead of replicating it (DDP)


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then linear decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def batch_example_indices(step: int, batch_size: int, dataset_size: int, seed: int) -> list[int]:
    """Rows of step ``step``'s global batch: consecutive slices of per-epoch permutations of the data."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, dataset_size)
        permutation = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        indices.append(int(permutation[offset]))
    return indices


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 1)


def latest_checkpoint(output_dir: str) -> str | None:
    paths = sorted(glob.glob(os.path.join(output_dir, CHECKPOINT_PATTERN.replace("{step:08d}", "*"))))
    return paths[-1] if paths else None


class Trainer:
    """Trains ``model`` (a causal LM over the CM3 vocabulary) on ``corpus`` with RA-CM3's objective."""

    def __init__(self, model: torch.nn.Module, corpus: RetrievalCorpus, config: TrainingConfig,
                 options: SequenceOptions | None = None):
        self.config, self.corpus = config, corpus
        self.options = options or SequenceOptions()
        self.rank, self.world_size = rank_and_world_size()
        self.device = next(model.parameters()).device
        self.model = model
        if self.world_size > 1 and config.fsdp:
            fully_shard_units(llama_fsdp_units(model))
        elif self.world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate_factor(step, config.warmup_steps, config.steps))
        self.step = 0
        self.metrics_path = os.path.join(config.output_dir, "metrics.jsonl")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> str | None:
        """Every rank calls this (gathering sharded tensors is collective); rank 0 writes."""
        model_state, optimizer_state = full_training_state(self._unwrapped(), self.optimizer)
        if self.rank != 0:
            return None
        os.makedirs(self.config.output_dir, exist_ok=True)
        path = os.path.join(self.config.output_dir, CHECKPOINT_PATTERN.format(step=self.step))
        state = {"step": self.step, "model": model_state, "optimizer": optimizer_state,
                 "scheduler": self.scheduler.state_dict(), "config": asdict(self.config)}
        temporary = path + ".tmp"
        torch.save(state, temporary)
        os.replace(temporary, path)  # a kill mid-write never leaves a truncated checkpoint behind
        for old in sorted(glob.glob(os.path.join(self.config.output_dir, "checkpoint_*.pt")))[:-CHECKPOINTS_KEPT]:
            os.remove(old)
        return path

    def resume(self) -> bool:
        """Load the latest checkpoint in output_dir, if any; drop metrics logged after it."""
        path = latest_checkpoint(self.config.output_dir)
        if path is None:
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        load_full_training_state(self._unwrapped(), self.optimizer, state["model"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        if self.rank == 0 and os.path.exists(self.metrics_path):
            with open(self.metrics_path) as handle:
                kept = [line for line in handle if line.strip() and json.loads(line)["step"] < self.step]
            with open(self.metrics_path, "w") as handle:
                handle.writelines(kept)
        return True

    def _unwrapped(self) -> torch.nn.Module:
        return self.model.module if hasattr(self.model, "module") else self.model

    # ------------------------------------------------------------------ training
    def _autocast(self):
        # Native bf16 only (sm80+): emulated bf16 would reach Triton kernels that lack it.
        enabled = self.device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def train_step(self) -> dict:
        config = self.config
        indices = batch_example_indices(self.step, config.batch_size, len(self.corpus), config.seed)
        generator = step_generator(config.seed, self.step)
        # Every rank draws the whole batch's randomness, so draws do not depend on the world size.
        batch = self.corpus.training_batch(indices, self.options, generator)
        local = slice(self.rank, None, self.world_size)
        batch = type(batch)(*(tensor[local] for tensor in (batch.input_ids, batch.attention_mask, batch.labels,
                                                           batch.target_roles, batch.target_parts)),
                            batch.retrieved[local]).to(self.device)
        self.model.train()
        with self._autocast():
            # No attention_mask: batches are right-padded, so under the causal mask no real token
            # sees a pad, and pads carry no loss. Without a mask the plain-causal path (the mkfast
            # kernel where registered) runs instead of a 4-D masked SDPA.
            logits = self.model(input_ids=batch.input_ids, use_cache=False).logits
        loss, record = retrieval_augmented_loss(logits, batch, config.alpha)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        record["grad_norm"] = clip_grad_norm(list(self.model.parameters()), config.grad_clip)
        record["learning_rate"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        record["step"] = self.step
        self.step += 1
        return record

    def train(self, resume: bool = True) -> list[dict]:
        from tqdm import tqdm

        if resume:
            self.resume()
        records = []
        os.makedirs(self.config.output_dir, exist_ok=True)
        bar = tqdm(total=self.config.steps, initial=self.step, desc="racm3",
                   disable=not self.config.progress or self.rank != 0)
        while self.step < self.config.steps:
            record = self.train_step()
            records.append(record)
            if self.rank == 0 and record["step"] % self.config.log_every == 0:
                with open(self.metrics_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
                self.save_checkpoint()
        bar.close()
        if self.rank == 0:
            plot_losses(self.metrics_path, os.path.join(self.config.output_dir, "loss.png"))
        return records


def read_metrics(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_losses(metrics_paths: str | dict[str, str], output_path: str) -> None:
    """Main and total loss per step from one or several metrics.jsonl files (label -> path) to a PNG."""
    from mkfast.plotting import pyplot

    plt = pyplot()
    if plt is None:
        return

    if isinstance(metrics_paths, str):
        metrics_paths = {"": metrics_paths}
    figure, axis = plt.subplots(figsize=(7, 4))
    for label, path in metrics_paths.items():
        if not os.path.exists(path):
            continue
        records = read_metrics(path)
        steps = [record["step"] for record in records]
        prefix = f"{label} " if label else ""
        axis.plot(steps, [record["main_loss"] for record in records], label=f"{prefix}L_main")
        if any(record["retrieved_tokens"] for record in records):
            axis.plot(steps, [record["loss"] for record in records], label=f"{prefix}L_main + alpha L_retr",
                      alpha=0.6)
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy (nats / token)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(output_path, dpi=100)
    plt.close(figure)

"""The one place the trainers meet torch.distributed: torchrun's environment, FSDP2, full checkpoints."""

from __future__ import annotations

import math
import os

import torch
from torch import nn


def rank_and_world_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_from_environment(use_cuda: bool) -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns (rank, world_size).

    use_cuda: NCCL with one GPU per process (LOCAL_RANK's); otherwise gloo on the CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if use_cuda:
            local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            if torch.cuda.device_count() < local_processes:
                # NCCL refuses two ranks on one GPU; say so before it fails inside a collective.
                visible = torch.cuda.device_count()
                raise RuntimeError(f"{local_processes} processes per node but {visible} visible GPU(s): "
                                   "start one process per GPU, or hide the GPUs (CUDA_VISIBLE_DEVICES=) "
                                   "to train on the CPU with gloo")
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return rank_and_world_size()


def shutdown() -> None:
    """Leave the process group once every rank is done with it.

    Without the barrier, rank 0 (which serves the rendezvous store) can exit while another
    rank is still tearing down, and that rank aborts ('terminate called without an active exception').
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------- FSDP2
def llama_fsdp_units(language_model: nn.Module, embedding_looked_up_outside: bool = False) -> list[nn.Module]:
    """The modules of a LlamaForCausalLM-like model to shard one by one, innermost first.

    Default: every decoder layer, the embedding, the inner model (its final norm) and lm_head.
    ``embedding_looked_up_outside``: the caller embeds tokens itself before the model's forward
    (MKS2 splices image tokens into the input embeddings); FSDP2 would take the embedding for
    its root then, so only the layers and lm_head are sharded and the embedding and final norm
    stay replicated (frozen in MKS2, so nothing of theirs needs reducing).
    """
    inner = language_model.model
    if embedding_looked_up_outside:
        return [*inner.layers, language_model.lm_head]
    return [*inner.layers, inner.embed_tokens, inner, language_model.lm_head]


def fully_shard_units(units: list[nn.Module]) -> None:
    """FSDP2 over the default process group: each unit's parameters become DTensor shards,
    gathered for its forward and backward, gradients reduce-scattered (averaged over ranks).
    Build optimisers after this call: it replaces the parameters."""
    from torch.distributed.fsdp import fully_shard

    for unit in units:
        fully_shard(unit)


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def clip_grad_norm(parameters: list[torch.Tensor], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ that also takes a mix of FSDP2-sharded and plain parameters
    (torch's refuses the mix); returns the total norm before clipping."""
    if not any(is_sharded(parameter) for parameter in parameters) or all(is_sharded(p) for p in parameters):
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return float(norm.full_tensor() if is_sharded(norm) else norm)
    squares = []
    for parameter in parameters:
        if parameter.grad is not None:
            norm = torch.linalg.vector_norm(parameter.grad.float())
            squares.append(float(norm.full_tensor() if is_sharded(norm) else norm) ** 2)
    total = math.sqrt(sum(squares))
    coefficient = min(1.0, max_norm / (total + 1e-6))  # torch's clip coefficient
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad.mul_(coefficient)
    return total


def _state_dict_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Full (unsharded) tensors, gathered to rank 0's CPU memory when there are ranks.
    return StateDictOptions(full_state_dict=True, cpu_offload=torch.distributed.is_initialized())


def full_training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) as full tensors keyed by parameter name, for a plain,
    DDP or FSDP2 model alike. A collective under torch.distributed: every rank calls it;
    rank 0 gets the tensors (the others may get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _state_dict_options()
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options))


def load_full_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                             optimizer_state: dict, strict: bool = True) -> None:
    """The inverse of :func:`full_training_state`; every rank passes the full states.
    ``strict=False``: ``model_state`` may hold a subset of the parameters (the trained ones)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=strict)
    # Leftover gradients would make torch skip building the optimizer state it loads into.
    optimizer.zero_grad(set_to_none=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)

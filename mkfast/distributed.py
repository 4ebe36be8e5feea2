"""The one place the training commands start and stop torch.distributed (torchrun's environment)."""

from __future__ import annotations

import os

import torch


def rank_and_world_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_from_environment(use_cuda: bool) -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns (rank, world_size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return rank_and_world_size()


def shutdown() -> None:
    """Leave the process group once every rank is done with it.

    Without the barrier, rank 0 (which serves the rendezvous store) can exit while another
    rank is still tearing down, and that rank aborts ('terminate called without an active exception').
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

"""mome_ffn: ours vs the eager reference vs a PEFT-style composition vs the frozen GEMMs alone.

    python -m benchmarks.bench_mome [--quick]

Providers (one setup shared by all; nothing re-written here):
  mkfast                  MoMEFFN.forward: the fused op, backend "auto" (Triton on CUDA; on CPU
                          the cpu backend: torch matmuls, pre-activations saved, analytic backward)
  eager reference         mkfast.ops.mome_ffn_reference under plain autograd
  peft-style              MoMEFFN.forward_composed: nn.Linear + LoRA modules + router, unfused
  frozen GEMMs (matmul)   the five frozen projections alone with torch.matmul (forward), plus
                          their input-gradient GEMMs (forward+backward): the floor of the layer
TFLOP/s count only the frozen GEMMs: 2*M*d*(3*I + 2*Iv) forward, twice that forward+backward
(input gradients only: the frozen weights get none).
Activation memory saved for backward is counted with saved_tensors_hooks (every saved
tensor that is not a weight or the input), so it is measured on any device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
from torch import nn

import mkfast
from mkfast.layers.mome import MoMEFFN
from mkfast.layers.visual_memory import RMSNorm, VisualMemory
from mkfast.ops.mome import mome_ffn_reference

from .common import (
    Measurement,
    command_line,
    cpu_threads,
    interleaved_timings,
    peak_memory_mb,
    resolve_device,
    run_suite,
)

# Llama-2-7B: hidden 4096, MLP 11008, MVM hidden/4, LoRA rank 8 (docs/methods.md, MKS2 stage 2).
GPU_SHAPE = dict(hidden=4096, intermediate=11008, visual=1024, rank=8)
GPU_TOKENS, GPU_QUICK_TOKENS = (4096, 8192, 16384), (4096,)
# A CPU-sized layer (same ratios, 1/8 width) so the whole CPU run stays under 2 minutes on 2 cores.
CPU_SHAPE = dict(hidden=512, intermediate=1376, visual=128, rank=8)
CPU_TOKENS, CPU_QUICK_TOKENS = (256, 1024), (256,)
# main(cases=...): "target" is the GPU target's shape (Llama-2-7B sizes, 8192 tokens); "tiny" a dry run's.
CASE_SETS = {"target": (GPU_SHAPE, (8192,)),
             "tiny": (dict(hidden=64, intermediate=172, visual=16, rank=8), (16,))}
# One CPU thread: on the shared 2-core machine, 2 OpenMP threads under other jobs' load made
# the same forward 30x slower and erratic (0.78 s vs 0.02 s at 128 tokens, load average 8).
CPU_THREADS = 1


class _LlamaMLP(nn.Module):
    def __init__(self, hidden, intermediate):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)


def setup(tokens, hidden, intermediate, visual, rank, dtype, device):
    """A MoMEFFN with trained-looking (nonzero) LoRA B and memory, an input and an output gradient."""
    torch.manual_seed(0)
    memory = VisualMemory(hidden, ratio=visual / hidden)
    nn.init.normal_(memory.fc2.weight, std=visual ** -0.5)
    layer = MoMEFFN(_LlamaMLP(hidden, intermediate), memory, RMSNorm(hidden), rank=rank, alpha=2 * rank)
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.01)
    layer = layer.to(device=device, dtype=dtype)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    grad_output = torch.randn(tokens, hidden, device=device, dtype=dtype)
    return layer, x, grad_output


def reference_call(layer: MoMEFFN, x):
    """mome_ffn_reference on the layer's tensors (the same arguments the fused op gets)."""
    return mome_ffn_reference(x, layer.mome_weights())


def frozen_gemms(layer: MoMEFFN, x, grad_output, backward: bool):
    """The floor: the frozen projections' GEMMs only, forward and (optionally) their input gradients."""
    mlp, memory = layer.mlp, layer.visual_memory
    gate, up = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
    text_out = gate @ mlp.down_proj.weight.T
    visual_hidden = x @ memory.fc1.weight.T
    visual_out = visual_hidden @ memory.fc2.weight.T
    if backward:
        text_hidden_grad = grad_output @ mlp.down_proj.weight
        x_grad = text_hidden_grad @ mlp.gate_proj.weight + text_hidden_grad @ mlp.up_proj.weight
        x_grad = x_grad + (grad_output @ memory.fc2.weight) @ memory.fc1.weight
        return text_out, visual_out, up, x_grad
    return text_out, visual_out, up


def saved_activation_mb(layer: MoMEFFN, x, forward) -> float:
    """MiB of tensors autograd keeps for backward, other than the weights and the input itself."""
    excluded = {tensor.untyped_storage().data_ptr() for tensor in [x, *layer.parameters()]}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    del output
    return sum(storages.values()) / 2**20


# Tokens for the CPU measurement of the Triton backend's saved memory: the interpreter
# takes ~4 s per forward at this size (31 s at 256 tokens), and saved memory is linear in tokens.
INTERPRETER_TOKENS = 32


def _triton_saved_memory_on_cpu(shape) -> str:
    """The Triton backend's saved activations at INTERPRETER_TOKENS, run by the Triton interpreter on CPU.

    In a child process: Triton reads TRITON_INTERPRET when it decorates kernels, and this
    process must keep timing the real CPU paths.
    """
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    # This module's own name: mkfast.benchmarks.bench_mome installed, benchmarks.bench_mome in a checkout.
    command = [sys.executable, "-m", __spec__.name, "--saved-memory-only", str(INTERPRETER_TOKENS)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(command, env=environment, cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        return f"Triton saved memory not measured (interpreter run failed: {result.stderr.strip()[-300:]})."
    saved = json.loads(result.stdout.strip().splitlines()[-1])
    return (f"Saved for backward at M={INTERPRETER_TOKENS} (Triton backend run by the interpreter), MiB: "
            + ", ".join(f"{name} {value:.3f}" for name, value in saved.items()) + ".")


def saved_memory_report(tokens: int) -> dict[str, float]:
    """Saved-for-backward MiB of every provider at the CPU shape, forcing the Triton backend for mkfast."""
    layer, x, _ = setup(tokens, **CPU_SHAPE, dtype=torch.float32, device=torch.device("cpu"))
    with mkfast.use_backend("triton"):
        saved = {"mkfast (triton)": saved_activation_mb(layer, x, lambda: layer(x))}
    saved["eager reference"] = saved_activation_mb(layer, x, lambda: reference_call(layer, x))
    saved["peft-style"] = saved_activation_mb(layer, x, lambda: layer.forward_composed(x))
    return saved


def main(quick: bool = False, device: str | None = None, output_root: str | None = None,
         cases: str = "default") -> None:
    device = resolve_device(device)
    with cpu_threads(device, CPU_THREADS):
        _run(quick, device, output_root, cases)


def _measure(tokens, shape, dtype, device, warmup_rounds, repetitions) -> tuple[list[Measurement], str]:
    """Every provider at one token count, forward and forward+backward; and their saved memory (MiB)."""
    layer, x, grad_output = setup(tokens, **shape, dtype=dtype, device=device)
    trainable = [parameter for parameter in layer.parameters() if parameter.requires_grad]
    providers = {
        "mkfast": lambda: layer(x),
        "eager reference": lambda: reference_call(layer, x),
        "peft-style": lambda: layer.forward_composed(x),
    }
    gemm_flops = 2 * tokens * shape["hidden"] * (3 * shape["intermediate"] + 2 * shape["visual"])
    saved = {name: saved_activation_mb(layer, x, forward) for name, forward in providers.items()}
    memory_note = f"M={tokens}: " + ", ".join(f"{name} {value:.1f}" for name, value in saved.items())

    def with_backward(forward):
        return lambda: torch.autograd.grad(forward(), [x, *trainable], grad_output)

    measurements = []
    for mode, flops in (("forward", gemm_flops), ("forward+backward", 2 * gemm_flops)):
        case = {"tokens": tokens, **shape, "dtype": str(dtype).removeprefix("torch."), "mode": mode}
        backward = mode != "forward"
        calls = {name: with_backward(forward) if backward else forward for name, forward in providers.items()}
        calls["frozen GEMMs (matmul)"] = lambda backward=backward: frozen_gemms(layer, x.detach(),
                                                                                grad_output, backward)
        timings = interleaved_timings(calls, device, warmup_rounds=warmup_rounds, repetitions=repetitions)
        for name, call in calls.items():
            measurements.append(Measurement(case, name, timings[name], work={"tflops": flops},
                                            peak_memory_mb=peak_memory_mb(call, device)))
            print(f"{case} {name}: {measurements[-1].median_ms:.2f} ms", flush=True)
    return measurements, memory_note


def _run(quick: bool, device: torch.device, output_root: str | None, cases: str = "default") -> None:
    on_gpu = device.type == "cuda"
    shape = GPU_SHAPE if on_gpu else CPU_SHAPE
    if on_gpu:
        token_counts = GPU_QUICK_TOKENS if quick else GPU_TOKENS
    else:
        token_counts = CPU_QUICK_TOKENS if quick else CPU_TOKENS
    if cases != "default":
        shape, token_counts = CASE_SETS[cases]
    dtype = torch.bfloat16 if on_gpu else torch.float32
    repetitions = 3 if quick else (10 if on_gpu else 7)
    warmup_rounds = 3 if on_gpu else 1  # GPU: Triton compilation and cuBLAS heuristics settle
    measurements, memory_notes = [], []
    for tokens in token_counts:
        token_measurements, memory_note = _measure(tokens, shape, dtype, device, warmup_rounds, repetitions)
        measurements += token_measurements
        memory_notes.append(memory_note)
    notes = (
        ("bf16 on GPU. " if on_gpu else
         "fp32 on CPU (timings are CPU timings; the Triton kernels do not run here). ")
        + "TFLOP/s count only the frozen GEMMs (input gradients only in backward). "
        "Activation memory saved for backward, MiB, measured with saved_tensors_hooks: "
        + "; ".join(memory_notes) + "."
    )
    if not on_gpu and cases != "tiny":  # a dry run skips the interpreter's saved-memory child
        notes += (f" Shared 2-core machine, 1-minute load average {os.getloadavg()[0]:.1f} at the end of"
                  " the run.")
        notes += (" On CPU, mkfast runs its cpu backend (torch matmuls; it saves the same tensors as the"
                  " Triton backend). " + _triton_saved_memory_on_cpu(shape))
    run_suite("mome", measurements, device, baseline="peft-style", notes=notes, output_root=output_root)


if __name__ == "__main__":
    # The interpreter child of _triton_saved_memory_on_cpu; every other call is the usual command line.
    saved_memory = argparse.ArgumentParser(add_help=False)
    saved_memory.add_argument("--saved-memory-only", type=int, metavar="TOKENS")
    known, _ = saved_memory.parse_known_args()
    if known.saved_memory_only:
        print(json.dumps(saved_memory_report(known.saved_memory_only)))
    else:
        command_line(main, __doc__)

"""End-to-end training steps: the two models with mkfast's kernels vs the same models without them.

    python -m benchmarks.bench_e2e [--quick]

One step = forward + backward + AdamW update on one batch of random tokens (the data
pipeline is not timed). Two suites, each with its own baseline:

  e2e_racm3   RA-CM3's generator (a Llama-architecture decoder, built from config, every
              parameter trained) on sequences of 3 CM3 documents (2 retrieved + the main
              one, causal attention across all of them):
                mkfast   attn_implementation="mkfast" (mkfast.ops.attention)
                sdpa     attn_implementation="sdpa" (torch's fused attention), the baseline
  e2e_mks2    MKS2 stage 2 (visual memory + MoMEs in a Llama; LoRA and routers trained):
                mkfast            MoMEFFN.forward, the fused mome_ffn (backend auto)
                eager reference   the same op forced to its reference backend
                peft-style        MoMEFFN.forward_composed: nn.Linear + LoRA modules, unfused;
                                  the baseline
GPU sizes are the performance targets (a ~1B generator at sequence 4096; Llama-2-7B layers, a
few of them); CPU sizes are small, and on CPU mkfast's ops run their reference backends
(the kernels need a GPU), so CPU rows measure the code path, not the kernels.
"""

from __future__ import annotations

import contextlib
import os

import torch

import mkfast

from .common import (
    Measurement,
    command_line,
    cpu_threads,
    interleaved_timings,
    peak_memory_mb,
    resolve_device,
    run_suite,
)

# ~1B Llama-architecture generator (head dim 128, the attention target's), CM3 vocabulary
# of 32k text tokens + 8192 image codes; RA-CM3 trains at 4096 tokens per sequence.
RACM3_GPU = {"hidden": 2048, "layers": 16, "heads": 16, "intermediate": 5632, "vocab": 40192,
             "batch": 1, "sequence": 4096}
RACM3_CPU = {"hidden": 128, "layers": 2, "heads": 4, "intermediate": 344, "vocab": 2048,
             "batch": 1, "sequence": 512}
RACM3_CPU_QUICK = {**RACM3_CPU, "sequence": 128}
# Llama-2-7B layer sizes (4 of its 32 layers keep one step within seconds), 4096 tokens per step.
MKS2_GPU = {"hidden": 4096, "layers": 4, "heads": 32, "intermediate": 11008, "vocab": 32000,
            "batch": 4, "sequence": 1024}
MKS2_CPU = {"hidden": 256, "layers": 2, "heads": 4, "intermediate": 688, "vocab": 1000,
            "batch": 2, "sequence": 128}
MKS2_CPU_QUICK = {**MKS2_CPU, "sequence": 32}
# Quick on a GPU (the demo's kernels stage): the same architectures a few times smaller, so a
# pass is seconds, not the minutes of building a 1B model and four 7B layers twice.
RACM3_GPU_QUICK = {**RACM3_GPU, "hidden": 1024, "layers": 2, "heads": 8, "intermediate": 2816,
                   "sequence": 1024}
MKS2_GPU_QUICK = {**MKS2_GPU, "layers": 1, "batch": 1, "sequence": 512}
# main(cases="target") is the GPU sizes above with fewer repetitions (benchmarks/gpu_check.py);
# cases="tiny" the smallest models that still run every code path (its dry run).
RACM3_TINY = {"hidden": 64, "layers": 1, "heads": 2, "intermediate": 172, "vocab": 512, "batch": 1,
              "sequence": 64}
MKS2_TINY = {**RACM3_TINY, "vocab": 256, "sequence": 16}
LORA_RANK, LORA_ALPHA = 8, 16  # docs/methods.md, MKS2 stage 2
CPU_THREADS = 1  # see benchmarks.common.cpu_threads


def _llama(shape: dict, attention: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                         intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                         max_position_embeddings=shape["sequence"], tie_word_embeddings=False)
    config._attn_implementation = attention
    # Built on the device: a 1B model's random initialisation runs there, not on the host CPU.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).to(dtype=dtype)


def _training_step(model, tokens: torch.Tensor, device: torch.device):
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.98), foreach=True)

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _tokens(shape: dict, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, shape["vocab"], (shape["batch"], shape["sequence"]), generator=generator)
    return tokens.to(device)


@contextlib.contextmanager
def _peft_style(model):
    """Every MoMEFFN of ``model`` runs its unfused composition while inside."""
    from mkfast.layers.mome import MoMEFFN

    layers = [module for module in model.modules() if isinstance(module, MoMEFFN)]
    for layer in layers:
        layer.forward = layer.forward_composed
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def racm3_measurements(shape: dict, device: torch.device, dtype: torch.dtype, warmup_rounds: int,
                       repetitions: int) -> list[Measurement]:
    from mkfast.layers.attention import ATTENTION_NAME, register_transformers_attention

    register_transformers_attention()
    tokens = _tokens(shape, device)
    calls = {
        name: _training_step(_llama(shape, attention, device, dtype), tokens, device)
        for name, attention in (("mkfast", ATTENTION_NAME), ("sdpa", "sdpa"))
    }
    case = {**shape, "dtype": str(dtype).removeprefix("torch.")}
    timings = interleaved_timings(calls, device, warmup_rounds=warmup_rounds, repetitions=repetitions)
    token_count = shape["batch"] * shape["sequence"]
    return [Measurement(case, name, timings[name], work={"tokens": token_count},
                        peak_memory_mb=peak_memory_mb(call, device)) for name, call in calls.items()]


def mks2_measurements(shape: dict, device: torch.device, dtype: torch.dtype, warmup_rounds: int,
                      repetitions: int) -> list[Measurement]:
    from mkfast.mks2.patching import add_visual_memory, enable_momes

    model = _llama(shape, "sdpa", device, torch.float32)
    add_visual_memory(model)
    enable_momes(model, rank=LORA_RANK, alpha=LORA_ALPHA)
    with torch.no_grad():  # trained-looking adapters: LoRA B starts at zero
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.01)
    model = model.to(device=device, dtype=dtype)
    step = _training_step(model, _tokens(shape, device), device)

    def forced(backend: str):
        def call():
            with mkfast.use_backend(backend):
                step()
        return call

    def peft_style():
        with _peft_style(model):
            step()

    calls = {"mkfast": step, "eager reference": forced("reference"), "peft-style": peft_style}
    case = {**shape, "lora_rank": LORA_RANK, "dtype": str(dtype).removeprefix("torch.")}
    timings = interleaved_timings(calls, device, warmup_rounds=warmup_rounds, repetitions=repetitions)
    token_count = shape["batch"] * shape["sequence"]
    return [Measurement(case, name, timings[name], work={"tokens": token_count},
                        peak_memory_mb=peak_memory_mb(call, device)) for name, call in calls.items()]


def main(quick: bool = False, device: str | None = None, output_root: str | None = None,
         cases: str = "default") -> None:
    device = resolve_device(device)
    with cpu_threads(device, CPU_THREADS):
        _run(quick, device, output_root, cases)


def _run(quick: bool, device: torch.device, output_root: str | None, cases: str = "default") -> None:
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    repetitions = 3 if quick or cases == "tiny" else (5 if cases == "target" or not on_gpu else 10)
    warmup_rounds = 2 if on_gpu else 1  # GPU: Triton compilation and cuBLAS heuristics settle
    if cases != "default":
        racm3_shape, mks2_shape = (RACM3_GPU, MKS2_GPU) if cases == "target" else (RACM3_TINY, MKS2_TINY)
    elif on_gpu:
        racm3_shape, mks2_shape = (RACM3_GPU_QUICK, MKS2_GPU_QUICK) if quick else (RACM3_GPU, MKS2_GPU)
    else:
        racm3_shape, mks2_shape = (RACM3_CPU_QUICK, MKS2_CPU_QUICK) if quick else (RACM3_CPU, MKS2_CPU)
    where = ("bf16 weights on GPU" if on_gpu else
             "fp32 on CPU, 1 thread: mkfast's ops run their reference backends here (no kernels), "
             f"1-minute load average {os.getloadavg()[0]:.1f} when the run started")
    racm3 = racm3_measurements(racm3_shape, device, dtype, warmup_rounds, repetitions)
    run_suite("e2e_racm3", racm3, device, baseline="sdpa", output_root=output_root,
              notes="RA-CM3 generator training step (forward + backward + AdamW), every parameter trained; "
                    f"{where}.")
    mks2 = mks2_measurements(mks2_shape, device, dtype, warmup_rounds, repetitions)
    run_suite("e2e_mks2", mks2, device, baseline="peft-style", output_root=output_root,
              notes=(f"MKS2 stage-2 training step (forward + backward + AdamW of LoRA rank {LORA_RANK} "
                     "and the routers; the Llama and the visual memory frozen), SDPA attention in every "
                     f"row; {where}."))
    for measurement in racm3 + mks2:
        print(f"{measurement.case} {measurement.provider}: {measurement.median_ms:.1f} ms/step, "
              f"{measurement.rates()['tokens']:.0f} tokens/s", flush=True)


if __name__ == "__main__":
    command_line(main, __doc__)

"""mome_ffn: every backend against autograd through the eager reference, forward and every gradient."""

import dataclasses

import pytest
import torch
from helpers import assert_close, interpreter_dtypes, run_opcheck, tolerance

import mkfast
from mkfast.ops.mome import FROZEN_NAMES, TRAINABLE_NAMES, MoMEWeights, mome_ffn, mome_ffn_reference

BACKENDS = ["reference", "cpu", "triton"]


def make_inputs(tokens, hidden, intermediate, visual_size, rank, dtype, device="cpu", seed=0):
    """Op arguments with every LoRA B nonzero (a zero B would hide the LoRA paths from the test)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).to(device=device, dtype=dtype)

    inputs = {
        "x": randn(tokens, hidden),
        "text_norm_weight": 1.0 + randn(hidden, std=0.1), "visual_norm_weight": 1.0 + randn(hidden, std=0.1),
        "gate_weight": randn(intermediate, hidden, std=hidden ** -0.5),
        "up_weight": randn(intermediate, hidden, std=hidden ** -0.5),
        "down_weight": randn(hidden, intermediate, std=intermediate ** -0.5),
        "fc1_weight": randn(visual_size, hidden, std=hidden ** -0.5),
        "fc2_weight": randn(hidden, visual_size, std=visual_size ** -0.5),
        "router_weight": randn(2, hidden, std=hidden ** -0.5), "router_bias": randn(2, std=0.5),
    }
    in_out = {"gate": (hidden, intermediate), "up": (hidden, intermediate), "down": (intermediate, hidden),
              "fc1": (hidden, visual_size), "fc2": (visual_size, hidden)}
    for name, (fan_in, fan_out) in in_out.items():
        inputs[f"{name}_lora_A"] = randn(rank, fan_in, std=fan_in ** -0.5)
        inputs[f"{name}_lora_B"] = randn(fan_out, rank, std=rank ** -0.5)
    return inputs


# Different epsilons for the two norms, so a backend that swaps them is caught on small inputs.
TEXT_EPS, VISUAL_EPS = 1e-5, 1e-3


def weights_of(inputs, lora_scale=2.0) -> MoMEWeights:
    return MoMEWeights(**{name: inputs[name] for name in (*FROZEN_NAMES, *TRAINABLE_NAMES)},
                       lora_scale=lora_scale,
                       text_norm_eps=TEXT_EPS, visual_norm_eps=VISUAL_EPS)


def forward_and_grads(function, inputs, grad_output):
    """Output and the gradients of x and the twelve trainable tensors, frozen weights untouched."""
    leaves = {name: tensor.clone() for name, tensor in inputs.items()}
    wanted = ["x", *TRAINABLE_NAMES]
    for name in wanted:
        leaves[name].requires_grad_(True)
    output = function(leaves)
    grads = torch.autograd.grad(output, [leaves[name] for name in wanted], grad_output)
    assert all(leaves[name].grad is None and not leaves[name].requires_grad for name in FROZEN_NAMES)
    return output, dict(zip(wanted, grads, strict=True))


def run_reference(leaves, lora_scale=2.0):
    return mome_ffn_reference(leaves["x"], weights_of(leaves, lora_scale))


def run_backend(backend, lora_scale=2.0):
    def run(leaves):
        with mkfast.use_backend(backend):
            return mome_ffn(leaves["x"], weights_of(leaves, lora_scale))
    return run


def assert_as_accurate_as_reference(actual, reference, truth, message, slack=2.0):
    """16-bit check in the style of FlashAttention's tests: the backend's error against the fp32
    truth is at most ``slack`` times the 16-bit reference's own error, plus a floor of twice the
    dtype's atol relative to the largest entry (a few units in the last place of it).

    Elementwise tolerances fail on 16-bit sums with cancellation (a gradient entry near zero
    whose neighbours are ~80); this bound follows the reference's error instead. The floor is
    for tiny tensors (the router bias has 2 entries) where the reference's error is luck:
    it rounded 30.4052 to 30.406 where the kernels' fp32 path gave 30.469, 4 fp16 ulps.
    """
    error = (actual.float() - truth).abs().max().item()
    reference_error = (reference.float() - truth).abs().max().item()
    floor = 2 * tolerance(reference.dtype)["atol"] * max(1.0, truth.abs().max().item())
    bound = slack * reference_error + floor
    assert error <= bound, \
        f"{message}: error {error:.3g} > {bound:.3g} (reference's own error {reference_error:.3g})"


def check_backend(backend, tokens, hidden, intermediate, visual_size, rank, dtype, device="cpu", x_scale=1.0,
                  lora_scale=2.0):
    inputs = make_inputs(tokens, hidden, intermediate, visual_size, rank, dtype, device=device)
    inputs["x"] = inputs["x"] * x_scale
    grad_output = torch.randn(tokens, hidden).to(device=device, dtype=dtype)

    def reference(leaves):
        return run_reference(leaves, lora_scale)

    expected, expected_grads = forward_and_grads(reference, inputs, grad_output)
    actual, actual_grads = forward_and_grads(run_backend(backend, lora_scale), inputs, grad_output)
    assert actual.dtype == dtype and actual.shape == (tokens, hidden)
    assert all(actual_grads[name].dtype == dtype for name in actual_grads)
    if dtype == torch.float32:
        assert_close(actual, expected, scale=2.0, message="output")
        for name, grad in expected_grads.items():
            # Gradients of A/B and the router sum over every token: widen with the token count.
            assert_close(actual_grads[name], grad, scale=2.0 * max(1.0, tokens / 16),
                         message=f"grad of {name}")
        return
    truth, truth_grads = forward_and_grads(reference, {n: t.float() for n, t in inputs.items()},
                                           grad_output.float())
    assert_as_accurate_as_reference(actual, expected, truth, "output")
    for name, grad in expected_grads.items():
        assert_as_accurate_as_reference(actual_grads[name], grad, truth_grads[name], f"grad of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", interpreter_dtypes())
@pytest.mark.parametrize("tokens,hidden,intermediate,visual_size,rank", [
    (7, 96, 160, 24, 8),     # hidden not a power of two, odd token count
    (1, 48, 80, 12, 1),      # one token, rank 1
    (129, 40, 72, 10, 16),   # tokens one past a block multiple, rank 16
])
def test_forward_and_every_gradient_match_reference(backend, dtype, tokens, hidden, intermediate,
                                                    visual_size, rank):
    check_backend(backend, tokens, hidden, intermediate, visual_size, rank, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_200_matches_reference(backend):
    check_backend(backend, 9, 200, 136, 50, 8, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_tokens_than_one_tile_group_match_reference(backend):
    # 300 tokens = 10 row tiles of 32 under the interpreter: two groups of GROUP_M = 8, the last partial.
    check_backend(backend, 300, 40, 72, 10, 8, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", interpreter_dtypes())
def test_lora_scale_that_is_not_a_power_of_two_matches_reference(backend, dtype):
    # The triton backward rounds s (g B) to x's dtype once: exact only for power-of-two s.
    check_backend(backend, 33, 48, 80, 24, 8, dtype, lora_scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_inputs_where_each_norm_epsilon_matters_match_reference(backend):
    # mean(x^2) = 1e-4: the visual norm's epsilon (1e-3) dominates, the text one's (1e-5) does not.
    check_backend(backend, 5, 64, 96, 16, 4, torch.float32, x_scale=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens,hidden,intermediate,visual_size,rank",
                         [(1000, 1024, 2752, 256, 8), (129, 200, 344, 50, 16)])
def test_triton_on_gpu_matches_reference(dtype, tokens, hidden, intermediate, visual_size, rank):
    check_backend("triton", tokens, hidden, intermediate, visual_size, rank, dtype, device="cuda")


@pytest.mark.parametrize("tokens,hidden,intermediate,visual_size,rank",
                         [(7, 96, 160, 24, 8), (129, 40, 72, 10, 16)])
def test_cpu_backend_in_bf16_is_as_accurate_as_the_reference(tokens, hidden, intermediate, visual_size, rank):
    # The interpreter has no bf16, the cpu backend does: bf16 is checked here without a GPU.
    check_backend("cpu", tokens, hidden, intermediate, visual_size, rank, torch.bfloat16)


def test_auto_runs_the_cpu_backend_on_cpu_and_saves_only_the_residuals():
    from mkfast.backend import dispatchers

    assert dispatchers()["mome_ffn"].auto_choice(torch.device("cpu")) == "cpu"
    inputs = make_inputs(6, 32, 48, 8, 4, torch.float32)
    x = inputs["x"].requires_grad_(True)
    weights = weights_of(inputs)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        mome_ffn(x, weights)
    inputs_and_weights = {tensor.data_ptr() for tensor in [x, *weights.frozen(), *weights.trainable()]}
    residual_elements = sum(tensor.numel() for tensor in saved if tensor.data_ptr() not in inputs_and_weights)
    # gate_pre, up_pre (I), visual_pre (Iv), five rank-r outputs, router probs and rstd (2 each).
    assert residual_elements == 6 * (2 * 48 + 8 + 5 * 4 + 2 + 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_empty_output(backend):
    inputs = make_inputs(0, 16, 24, 4, 2, torch.float32)
    x = inputs["x"].requires_grad_(True)
    with mkfast.use_backend(backend):
        output = mome_ffn(x, weights_of(inputs))
        assert output.shape == (0, 16)
        (x_grad,) = torch.autograd.grad(output.sum(), [x])
    assert x_grad.shape == (0, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_op_passes_opcheck(backend):
    inputs = make_inputs(5, 24, 40, 6, 4, torch.float32)
    weights = weights_of(inputs)
    trainable = [tensor.requires_grad_(True) for tensor in weights.trainable()]
    args = (inputs["x"].requires_grad_(True), weights.frozen(), trainable, list(weights.floats()), backend)
    run_opcheck(torch.ops.mkfast.mome_ffn.default, args)


@pytest.mark.slow
def test_torch_compile_runs_the_backward_of_the_backend_it_was_called_under():
    """The backend is an argument of the custom op, so a compiled (or cached) graph holds it: one
    compiled function called under two backends runs each one's own backward."""
    import mkfast.ops.mome_fused as fused

    inputs = make_inputs(5, 24, 40, 6, 4, torch.float32)
    weights = weights_of(inputs)
    compiled = torch.compile(lambda x: mome_ffn(x, weights))
    ran = []
    original = fused.fused_backward

    def recording(backend, *args):
        ran.append(backend)
        return original(backend, *args)

    fused.fused_backward = recording
    try:
        for backend in ("triton", "cpu"):
            x = inputs["x"].clone().requires_grad_(True)
            with mkfast.use_backend(backend):
                (compiled_grad,) = torch.autograd.grad(compiled(x).sum(), [x])
                (eager_grad,) = torch.autograd.grad(mome_ffn(x, weights).sum(), [x])
            assert ran[-2:] == [backend, backend]
            assert_close(compiled_grad, eager_grad)
    finally:
        fused.fused_backward = original


def test_invalid_inputs_are_refused_with_the_argument_named():
    inputs = make_inputs(4, 16, 24, 4, 2, torch.float32)
    weights = weights_of(inputs, lora_scale=1.0)
    x = inputs["x"]

    def changed(**changes):
        return dataclasses.replace(weights, **changes)

    with pytest.raises(ValueError,
                       match=r"x must have last dim \(d\) like gate_weight's in_features 16, got 12"):
        mome_ffn(x[:, :12], weights)
    names = (*FROZEN_NAMES, *TRAINABLE_NAMES)
    half = {name: getattr(weights, name).half() for name in names if name != "down_weight"}
    with pytest.raises(TypeError, match="down_weight must have x's dtype torch.float16, got torch.float32"):
        mome_ffn(x.half(), changed(**half))
    with pytest.raises(TypeError, match="x must be float32/float16/bfloat16, got torch.int64"):
        mome_ffn(x.long(), weights)
    with pytest.raises(ValueError, match=r"up_lora_B must have shape \(24, 2\)"):
        mome_ffn(x, changed(up_lora_B=torch.zeros(24, 3)))
    with pytest.raises(ValueError, match="fc1_weight is frozen"):
        mome_ffn(x, changed(fc1_weight=weights.fc1_weight.clone().requires_grad_()))
    meta = {name: getattr(weights, name).to("meta") for name in (*FROZEN_NAMES, *TRAINABLE_NAMES)
            if name != "router_weight"}
    with pytest.raises(ValueError, match="router_weight must be on meta like the other inputs, got cpu"):
        mome_ffn(x.to("meta"), changed(**meta))
    with pytest.raises(TypeError, match="lora_scale must be a float, got str"):
        mome_ffn(x, changed(lora_scale="2"))
    with pytest.raises(TypeError, match="weights must be a MoMEWeights, got dict"):
        mome_ffn(x, {"gate_weight": weights.gate_weight})


# --------------------------------------------------------------------------- sm_90 compile (no GPU needed)
SM90_COMPILE_SCRIPT = r"""
import json, os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mkfast.kernels import mome

FP32_POINTERS = {"probs_ptr", "rstd_ptr", "partial_ptr", "scaled_grad_ptr", "logits_grad_ptr", "row_sums_ptr",
                 "text_score_ptr", "visual_score_ptr", "down_lora_A_grad_ptr", "fc2_lora_A_grad_ptr",
                 "gate_lowrank_grad_partial_ptr", "up_lowrank_grad_partial_ptr",
                 "fc1_lowrank_grad_partial_ptr", "gate_lora_B_grad_ptr", "up_lora_B_grad_ptr",
                 "fc1_lora_B_grad_ptr", "lora_B_grad_ptr", "products_ptr"}
WIDTHS = {"hidden", "width", "intermediate", "visual_size"}
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

def compile_for_sm90(kernel, constexprs, num_warps, num_stages):
    # Specialise as a launch at Llama sizes would: 16-divisible pointers and widths.
    if isinstance(kernel, triton.runtime.autotuner.Autotuner):
        kernel = kernel.fn
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FP32_POINTERS else "*bf16"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in ("lora_scale", "text_eps", "visual_eps"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in WIDTHS:
                attrs[(index,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, "kernel.ptx")
        with open(ptx, "w") as handle:
            handle.write(compiled.asm["ptx"])
        command = [PTXAS if os.path.exists(PTXAS) else "ptxas", "--gpu-name", "sm_90a", "-v", ptx,
                   "-o", os.path.join(folder, "kernel.cubin")]
        report = subprocess.run(command, capture_output=True, text=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return {"shared": compiled.metadata.shared, "pipelined": "async_copy" in compiled.asm["ttgir"],
            "spill_bytes": int(spills[1]) + int(spills[2]) if spills else None,
            "wgmma": "wgmma.mma_async" in compiled.asm["ptx"]}

def tile(block_m, block_n, block_k):
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, RANK_PAD=16, PRECISION="tf32",
                GROUP_M=mome.GROUP_M)

block_m, block_k, row_warps, row_stages = mome.ROW_TILE
rows = dict(BLOCK_M=block_m, BLOCK_K=block_k)
cases = [
    ("norm_in", mome._mome_norm_in_kernel, dict(TEXT_COLUMNS=32, VISUAL_COLUMNS=16, PRECISION="tf32", **rows),
     row_warps, row_stages),
    ("act_lowrank", mome._mome_act_lowrank_kernel, dict(RANK_PAD=16, PRECISION="tf32", **rows),
     row_warps, row_stages),
    ("out_lowrank_grad", mome._mome_out_lowrank_grad_kernel, dict(RANKS_PAD=16, PRECISION="tf32", **rows),
     row_warps, row_stages),
    ("norm_backward", mome._mome_norm_backward_kernel,
     dict(LOWRANK_PAD=32, ROW_CHUNK=mome.NORM_BACKWARD_ROW_CHUNK, PRECISION="tf32", **rows), row_warps,
     row_stages),
]
for name, kernel, tiles, extra in (
    ("expert_in", mome._mome_expert_in_kernel, mome.EXPERT_IN_TILES, dict(GATED=True)),
    ("expert_out", mome._mome_expert_out_kernel, mome.EXPERT_OUT_TILES, {}),
    ("grad_input", mome._mome_grad_input_kernel, mome.GRAD_INPUT_TILES, dict(TEXT_RANK_PAD=16)),
    ("grad_hidden", mome._mome_grad_hidden_kernel, [mome.GRAD_HIDDEN_TILE], {}),
):
    for block_m, block_n, block_k, warps, stages in tiles:
        constexprs = dict(**extra, **tile(block_m, block_n, block_k))
        cases.append((f"{name} {block_m}x{block_n}x{block_k}", kernel, constexprs, warps, stages))
print(json.dumps({name: compile_for_sm90(*case) for name, *case in cases}))
"""
H100_SHARED_MEMORY_BYTES = 227 * 1024
GEMM_KERNELS = ("expert_in", "expert_out", "grad_input", "grad_hidden")


@pytest.mark.slow
def test_kernels_compile_for_sm90_on_wgmma_without_spills():
    """bf16, every tile a launcher or autotuner can pick, Llama-size (16-divisible) widths, for sm_90a.

    Catches GPU-only compile errors on CPU CI (dtype mixes in tl.dot the interpreter accepts),
    shared memory over an H100's limit, loads that stopped pipelining, register spills (ptxas -v)
    and GEMM kernels that fell back from wgmma to mma.sync. Static checks, not timings.
    """
    import json
    import os
    import shutil
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", "ptxas")) \
            and shutil.which("ptxas") is None:
        pytest.skip("no ptxas to compile for sm_90")
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    completed = subprocess.run([sys.executable, "-c", SM90_COMPILE_SCRIPT], env=environment,
                               capture_output=True, text=True, timeout=900, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        assert result["shared"] <= H100_SHARED_MEMORY_BYTES, f"{name}: {result['shared']} B of shared memory"
        assert result["pipelined"], f"{name}: global loads are not pipelined"
        assert result["spill_bytes"] == 0, f"{name}: {result['spill_bytes']} B of register spill"
        if name.startswith(GEMM_KERNELS):
            assert result["wgmma"], f"{name}: no wgmma (mma.sync only)"

"""VisualMemory and MoMEFFN: the drop-in modules on top of mkfast.ops.mome_ffn."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch import nn

import mkfast
from mkfast.layers.mome import MoMEFFN
from mkfast.layers.visual_memory import RMSNorm, VisualMemory


class LlamaStyleMLP(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, hidden_states):
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


def make_layer(hidden_size=40, intermediate_size=72, rank=4, dtype=torch.float32):
    memory = VisualMemory(hidden_size)
    nn.init.normal_(memory.fc2.weight, std=0.2)  # a trained memory, not the zero-initialised one
    norm = RMSNorm(hidden_size)
    nn.init.normal_(norm.weight, mean=1.0, std=0.1)
    layer = MoMEFFN(LlamaStyleMLP(hidden_size, intermediate_size), memory, norm, rank=rank, alpha=16)
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2)  # nonzero B so the LoRA paths are exercised
    return layer.to(dtype)


def test_fresh_visual_memory_outputs_zero_and_has_quarter_width():
    memory = VisualMemory(96)
    assert memory.inner_size == 24 and memory.fc1.weight.shape == (24, 96)
    assert torch.equal(memory(torch.randn(2, 3, 96)), torch.zeros(2, 3, 96))


def test_visual_memory_is_fc2_silu_fc1_of_its_norm_without_residual():
    memory = VisualMemory(32, ratio=0.5)
    nn.init.normal_(memory.fc2.weight)
    x = torch.randn(5, 32)
    normalized = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert_close(memory(x), F.silu(normalized @ memory.fc1.weight.T) @ memory.fc2.weight.T)


def test_mome_freezes_wrapped_modules_and_trains_only_lora_and_router():
    layer = make_layer()
    trainable = {name for name, parameter in layer.named_parameters() if parameter.requires_grad}
    projections = ["gate_proj", "up_proj", "down_proj", "fc1", "fc2"]
    lora = {f"{p}_lora_{part}" for p in projections for part in "AB"}
    assert trainable == lora | {"router.weight", "router.bias"}
    assert set(layer.adapter_state_dict()) == trainable
    assert layer.gate_proj_lora_A.shape == (4, 40) and layer.down_proj_lora_B.shape == (40, 4)


@pytest.mark.parametrize("shape", [(2, 7, 40), (13, 40)])
def test_fused_forward_and_grads_match_the_peft_style_composition(shape):
    layer = make_layer()
    x = torch.randn(*shape, requires_grad=True)
    trainable = [parameter for parameter in layer.parameters() if parameter.requires_grad]
    grad_output = torch.randn(*shape)
    fused = layer(x)
    composed = layer.forward_composed(x)
    assert fused.shape == shape
    assert_close(fused, composed)
    fused_grads = torch.autograd.grad(fused, [x, *trainable], grad_output)
    composed_grads = torch.autograd.grad(composed, [x, *trainable], grad_output)
    for fused_grad, composed_grad in zip(fused_grads, composed_grads, strict=True):
        assert_close(fused_grad, composed_grad)
    frozen = [parameter for parameter in layer.parameters() if not parameter.requires_grad]
    assert all(parameter.grad is None for parameter in frozen)


def test_fresh_lora_leaves_the_experts_unchanged():
    layer = make_layer()
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            if "lora_B" in name:
                parameter.zero_()
    x = torch.randn(6, 40)
    probs = torch.softmax(layer.router(layer.norm(x)), dim=-1)
    expected = probs[:, :1] * layer.visual_memory(x) + probs[:, 1:] * layer.mlp(layer.norm(x))
    assert_close(layer(x), expected)


def test_input_dtype_other_than_the_weights_is_computed_in_the_weights_dtype():
    layer = make_layer(dtype=torch.float16)
    x = torch.randn(3, 40)
    output = layer(x)
    assert output.dtype == torch.float32
    assert_close(output, layer(x.half()), dtype=torch.float16)


def test_adapter_state_dict_round_trips():
    source, target = make_layer(), make_layer()
    target.load_adapter_state_dict(source.adapter_state_dict())
    x = torch.randn(4, 40)
    target.mlp.load_state_dict(source.mlp.state_dict())
    target.visual_memory.load_state_dict(source.visual_memory.state_dict())
    target.norm.load_state_dict(source.norm.state_dict())
    assert torch.equal(target(x), source(x))
    with pytest.raises(KeyError, match="missing"):
        target.load_adapter_state_dict({})


def test_mlp_with_bias_is_refused():
    mlp = LlamaStyleMLP(8, 16)
    mlp.up_proj = nn.Linear(8, 16, bias=True)
    with pytest.raises(TypeError, match="mlp.up_proj must be an nn.Linear without bias"):
        MoMEFFN(mlp, VisualMemory(8), RMSNorm(8))


def _saved_activation_bytes(layer, x, forward):
    """Bytes autograd keeps for backward, other than the weights and the input."""
    excluded = {tensor.untyped_storage().data_ptr() for tensor in [x, *layer.parameters()]}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in excluded:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_layer_on_batched_tokens_matches_the_composition(dtype):
    layer = make_layer(hidden_size=48, intermediate_size=80, rank=8, dtype=dtype)
    x = torch.randn(2, 5, 48).to(dtype).requires_grad_(True)
    trainable = [parameter for parameter in layer.parameters() if parameter.requires_grad]
    grad_output = torch.randn(2, 5, 48).to(dtype)
    with mkfast.use_backend("triton"):
        fused = layer(x)
    composed = layer.forward_composed(x)
    assert fused.shape == (2, 5, 48) and fused.dtype == dtype
    # fp16: the composition rounds every projection, the kernels keep fp32 between them.
    scale = 1.0 if dtype == torch.float32 else 8.0
    assert_close(fused, composed, scale=scale)
    fused_grads = torch.autograd.grad(fused, [x, *trainable], grad_output)
    composed_grads = torch.autograd.grad(composed, [x, *trainable], grad_output)
    names = ["x", *[n for n, p in layer.named_parameters() if p.requires_grad]]
    for name, fused_grad, composed_grad in zip(names, fused_grads, composed_grads, strict=True):
        assert_close(fused_grad, composed_grad, scale=scale * max(1.0, composed_grad.abs().max().item() / 4),
                     message=f"grad of {name}")


def test_non_contiguous_input_gives_the_contiguous_result():
    layer = make_layer()
    x = torch.randn(40, 6).T  # (6, 40) with strides (1, 6)
    assert not x.is_contiguous()
    with mkfast.use_backend("triton"):
        assert_close(layer(x), layer(x.contiguous()))


def test_triton_backend_saves_at_least_40_percent_less_than_the_peft_composition():
    """docs/performance.md's memory target, counted exactly: saved activations do not depend on the device."""
    layer = make_layer(hidden_size=64, intermediate_size=172, rank=8)
    x = torch.randn(16, 64, requires_grad=True)
    with mkfast.use_backend("triton"):
        fused = _saved_activation_bytes(layer, x, lambda: layer(x))
    composed = _saved_activation_bytes(layer, x, lambda: layer.forward_composed(x))
    assert 0 < fused <= 0.6 * composed, f"fused saves {fused} B, the composition {composed} B"


def test_layer_compiles_with_torch_compile_and_matches_eager():
    layer = make_layer()
    x = torch.randn(2, 3, 40, requires_grad=True)
    with mkfast.use_backend("triton"):
        compiled_output = torch.compile(layer)(x)
        (compiled_grad,) = torch.autograd.grad(compiled_output.sum(), [x])
        eager_output = layer(x)
        (eager_grad,) = torch.autograd.grad(eager_output.sum(), [x])
    assert_close(compiled_output, eager_output)
    assert_close(compiled_grad, eager_grad)


def test_mlp_with_another_activation_is_refused():
    mlp = LlamaStyleMLP(8, 16)
    mlp.act_fn = nn.GELU()
    with pytest.raises(TypeError, match="mlp.act_fn must be SiLU"):
        MoMEFFN(mlp, VisualMemory(8), RMSNorm(8))


def test_wraps_a_transformers_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=4)
    mlp, norm = LlamaMLP(config), LlamaRMSNorm(32, eps=config.rms_norm_eps)
    layer = MoMEFFN(mlp, VisualMemory(32, eps=config.rms_norm_eps), norm, rank=2)
    x = torch.randn(3, 32)
    # Fresh LoRA (B = 0) and a fresh memory (fc2 = 0): h_M = S_2 * mlp(norm(x)).
    probs = torch.softmax(layer.router(norm(x)), dim=-1)
    assert_close(layer(x), probs[:, 1:] * mlp(norm(x)))

"""Fault injection: bad inputs to every op and layer, and saves of a memory killed at their dangerous points.

Each bad-input row states the error type and a phrase of its message: a clear error names the
argument, what was expected and what came. Kills are injected through hooks (an exception raised
at a chosen step of the save), never by timing.
"""

import json
import math
import multiprocessing
import os

import pytest
import torch
from helpers import devices_to_test
from torch import nn

import mkfast
from mkfast import cli
from mkfast.errors import UsageError
from mkfast.layers.attention import document_ids_from_position_ids
from mkfast.layers.mome import MoMEFFN
from mkfast.layers.visual_memory import RMSNorm, VisualMemory
from mkfast.ops.attention import attention, attention_allowed_mask, decode_attention
from mkfast.ops.topk_dedup import topk_dedup
from mkfast.racm3 import memory_files
from mkfast.racm3.memory import Memory


def randn(*shape, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)


def small_mome_layer(hidden_size=8):
    mlp = nn.Module()
    mlp.gate_proj = nn.Linear(hidden_size, 12, bias=False)
    mlp.up_proj = nn.Linear(hidden_size, 12, bias=False)
    mlp.down_proj = nn.Linear(12, hidden_size, bias=False)
    return MoMEFFN(mlp, VisualMemory(hidden_size), RMSNorm(hidden_size), rank=2)


def _mome_weights(**floats):
    import dataclasses

    return dataclasses.replace(small_mome_layer().mome_weights(), **floats)


Q, K, V = randn(1, 2, 4, 16), randn(1, 2, 4, 16), randn(1, 2, 4, 16)
CACHE = randn(1, 2, 8, 16)
LENGTHS = torch.tensor([5])


def _wrong_adapter_shape():
    layer = small_mome_layer()
    state = layer.adapter_state_dict()
    state["fc1_lora_A"] = torch.zeros(3, 3)
    layer.load_adapter_state_dict(state)


def _under_autocast(call):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return call()


BAD_INPUTS = {
    # attention
    "attention q not a tensor": (lambda: attention([1.0], K, V), TypeError, "q must be a torch.Tensor"),
    "attention q 3-D": (lambda: attention(Q[0], K, V), ValueError, "q must be 4-D"),
    "attention q int": (lambda: attention(Q.int(), K, V), TypeError, "q must be float32/float16/bfloat16"),
    "attention k dtype": (lambda: attention(Q, K.half(), V), TypeError, "k must be float32"),
    "attention k v shapes": (
        lambda: attention(Q, K, V[:, :1]),
        ValueError,
        "k and v must have the same shape",
    ),
    "attention heads not GQA": (
        lambda: attention(randn(1, 3, 4, 16), K, V),
        ValueError,
        "multiple of k's heads",
    ),
    "attention kv 0 heads": (lambda: attention(Q, K[:, :0], V[:, :0]), ValueError, "multiple of k's heads"),
    "attention head dim 0": (lambda: attention(Q[..., :0], K[..., :0], V[..., :0]), ValueError, "head dim D"),
    "attention S_kv < S_q": (lambda: attention(Q, K[:, :, :2], V[:, :, :2]), ValueError, "at least as many"),
    "attention causal int": (lambda: attention(Q, K, V, causal=1), TypeError, "causal must be a bool"),
    "attention scale str": (lambda: attention(Q, K, V, scale="1"), TypeError, "scale must be a float"),
    "attention scale nan": (
        lambda: attention(Q, K, V, scale=math.nan),
        ValueError,
        "scale must be finite, got nan",
    ),
    "attention scale inf": (
        lambda: attention(Q, K, V, scale=math.inf),
        ValueError,
        "scale must be finite, got inf",
    ),
    "attention document ids float": (
        lambda: attention(Q, K, V, document_ids=torch.zeros(1, 4)),
        TypeError,
        "document_ids must be int32/int64",
    ),
    "attention document ids shape": (
        lambda: attention(Q, K, V, document_ids=torch.zeros(1, 3, dtype=torch.int64)),
        ValueError,
        "document_ids must be (B, S)",
    ),
    "attention document ids past int32": (
        lambda: attention(Q, K, V, document_ids=torch.tensor([[0, 0, 2**32, 2**32]])),
        ValueError,
        "document_ids must fit in int32",
    ),
    "attention document ids below int32": (
        lambda: attention(Q, K, V, document_ids=torch.tensor([[0, 0, -(2**31) - 1, 1]])),
        ValueError,
        "document_ids must fit in int32",
    ),
    # decode_attention
    "decode q 3-D": (lambda: decode_attention(Q[0], CACHE, CACHE, LENGTHS), ValueError, "q must be 4-D"),
    "decode lengths float": (
        lambda: decode_attention(Q[:, :, :1], CACHE, CACHE, LENGTHS.float()),
        TypeError,
        "cache_seqlens must be int32/int64",
    ),
    "decode lengths past cache": (
        lambda: decode_attention(Q[:, :, :1], CACHE, CACHE, torch.tensor([9])),
        ValueError,
        "cache_seqlens must be in [T, L_max]",
    ),
    "decode scale nan": (
        lambda: decode_attention(Q[:, :, :1], CACHE, CACHE, LENGTHS, scale=math.nan),
        ValueError,
        "scale must be finite",
    ),
    "decode q requires grad": (
        lambda: decode_attention(Q[:, :, :1].clone().requires_grad_(), CACHE, CACHE, LENGTHS),
        RuntimeError,
        "decode_attention: has no backward, got q with requires_grad=True",
    ),
    "decode cache requires grad": (
        lambda: decode_attention(Q[:, :, :1], CACHE.clone().requires_grad_(), CACHE, LENGTHS),
        RuntimeError,
        "got k_cache with requires_grad=True",
    ),
    # topk_dedup (its own semantics are tested in test_topk_dedup.py)
    "topk memory 3-D": (lambda: topk_dedup(randn(2, 8), randn(3, 4, 8), 2), ValueError, "memory must be 2-D"),
    "topk memory width": (
        lambda: topk_dedup(randn(2, 8), randn(5, 4), 2),
        ValueError,
        "memory must have last dim",
    ),
    "topk queries int": (
        lambda: topk_dedup(randn(2, 8).int(), randn(5, 8), 2),
        TypeError,
        "queries must be float",
    ),
    "topk k 0": (lambda: topk_dedup(randn(2, 8), randn(5, 8), 0), ValueError, "k must be positive"),
    # MoMEFFN / mome_ffn
    "MoMEFFN int64 hidden states": (
        lambda: small_mome_layer()(torch.ones(2, 8, dtype=torch.int64)),
        TypeError,
        "MoMEFFN: hidden_states must be float32/float16/bfloat16, got torch.int64",
    ),
    "MoMEFFN int hidden states under autocast": (
        lambda: _under_autocast(lambda: small_mome_layer()(torch.ones(2, 8, dtype=torch.int32))),
        TypeError,
        "hidden_states must be float32/float16/bfloat16, got torch.int32",
    ),
    "attention int q under autocast": (
        lambda: _under_autocast(lambda: attention(Q.int(), K, V)),
        TypeError,
        "q must be float32/float16/bfloat16, got torch.int32",
    ),
    "MoMEFFN alpha nan": (
        lambda: MoMEFFN(small_mome_layer().mlp, VisualMemory(8), RMSNorm(8), alpha=math.nan),
        ValueError,
        "MoMEFFN: alpha must be finite, got nan",
    ),
    "mome_ffn lora_scale inf": (
        lambda: mkfast.ops.mome_ffn(randn(2, 8), _mome_weights(lora_scale=math.inf)),
        ValueError,
        "mome_ffn: lora_scale must be finite, got inf",
    ),
    "mome_ffn eps nan": (
        lambda: mkfast.ops.mome_ffn(randn(2, 8), _mome_weights(text_norm_eps=math.nan)),
        ValueError,
        "mome_ffn: text_norm_eps must be finite",
    ),
    "mome_ffn eps negative": (
        lambda: mkfast.ops.mome_ffn(randn(2, 8), _mome_weights(visual_norm_eps=-1.0)),
        ValueError,
        "mome_ffn: visual_norm_eps must be >= 0, got -1.0",
    ),
    "MoMEFFN rank 0": (
        lambda: MoMEFFN(small_mome_layer().mlp, VisualMemory(8), RMSNorm(8), rank=0),
        ValueError,
        "rank must be a positive int",
    ),
    "MoMEFFN adapter missing key": (
        lambda: small_mome_layer().load_adapter_state_dict({}),
        KeyError,
        "adapter keys differ",
    ),
    "MoMEFFN adapter wrong shape": (
        _wrong_adapter_shape,
        ValueError,
        "adapter 'fc1_lora_A' must have shape (2, 8), got (3, 3)",
    ),
    # VisualMemory / RMSNorm
    "VisualMemory ratio nan": (
        lambda: VisualMemory(16, ratio=math.nan),
        ValueError,
        "ratio must be a positive finite number, got nan",
    ),
    "VisualMemory ratio inf": (
        lambda: VisualMemory(16, ratio=math.inf),
        ValueError,
        "ratio must be a positive",
    ),
    "VisualMemory ratio 0": (lambda: VisualMemory(16, ratio=0), ValueError, "ratio must be a positive"),
    "VisualMemory hidden size 0": (lambda: VisualMemory(0), ValueError, "hidden_size must be a positive int"),
    "RMSNorm hidden size float": (
        lambda: RMSNorm(16.0),
        ValueError,
        "hidden_size must be a positive int, got 16.0",
    ),
    "RMSNorm wrong input size": (
        lambda: RMSNorm(16)(randn(2, 8)),
        ValueError,
        "RMSNorm: hidden_states must be (..., 16) like its weight, got shape (2, 8)",
    ),
    "RMSNorm int input": (
        lambda: RMSNorm(4)(torch.ones(2, 4, dtype=torch.int64)),
        TypeError,
        "RMSNorm: hidden_states must be floating point, got torch.int64",
    ),
    "VisualMemory wrong input size": (
        lambda: VisualMemory(16)(randn(2, 8)),
        ValueError,
        "hidden_states must be (..., 16)",
    ),
    "document ids from 1-D positions": (
        lambda: document_ids_from_position_ids(torch.arange(5)),
        ValueError,
        "position_ids must be 2-D (B, S), got (5,)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error(case):
    call, error, phrase = BAD_INPUTS[case]
    with pytest.raises(error) as raised:
        call()
    assert phrase in str(raised.value)


# --------------------------------------------------------------------------- odd inputs handled
def test_attention_with_zero_query_heads_returns_empty_instead_of_crashing():
    # ATen's CPU kernel divides by the head count (SIGFPE kills the process): the op never reaches it.
    out = attention(randn(1, 0, 4, 16), randn(1, 1, 4, 16), randn(1, 1, 4, 16))
    assert out.shape == (1, 0, 4, 16)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize(
    "documents, key_length", [(False, 6), (False, 9), (True, 6)]
)  # documents: S_q == S_kv
def test_nan_propagates_on_the_cpu_backend_as_in_the_reference(causal, documents, where, key_length):
    tensors = {"q": randn(1, 2, 6, 8), "k": randn(1, 2, key_length, 8), "v": randn(1, 2, key_length, 8)}
    tensors[where][0, 0, 2, 3] = math.nan
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 1]]) if documents else None
    outputs = {}
    for backend in ("cpu", "reference"):
        with mkfast.use_backend(backend):
            outputs[backend] = attention(**tensors, causal=causal, document_ids=document_ids)
    assert outputs["reference"].isnan().any()
    assert torch.equal(outputs["cpu"].isnan(), outputs["reference"].isnan())
    finite = ~outputs["reference"].isnan()
    torch.testing.assert_close(outputs["cpu"][finite], outputs["reference"][finite])


BACKEND_DEVICES = [pytest.param("reference", "cpu"), pytest.param("cpu", "cpu")] + [
    pytest.param("triton", device.values[0], marks=device.marks) for device in devices_to_test()
]


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("documents, key_length", [(False, 6), (False, 9), (True, 6)])
def test_nan_is_never_hidden_on_any_backend(backend, device, causal, where, documents, key_length):
    """A NaN query's row is NaN, and no other; a NaN key or value reaches at least every query
    allowed to attend to it (the reference spreads it to the whole head, block-skipping kernels
    to fewer rows)."""
    tensors = {"q": randn(1, 2, 6, 16), "k": randn(1, 2, key_length, 16), "v": randn(1, 2, key_length, 16)}
    tensors[where][0, 0, 2, 3] = math.nan
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 1]], device=device) if documents else None
    with mkfast.use_backend(backend):
        out = attention(
            **{name: tensor.to(device) for name, tensor in tensors.items()},
            causal=causal,
            document_ids=document_ids,
        )
    nan_rows = out[0, 0].isnan().any(-1).cpu()
    if where == "q":
        assert nan_rows.tolist() == [row == 2 for row in range(6)]
    else:
        allowed = attention_allowed_mask(6, key_length, causal, document_ids, device)[0, 0, :, 2].cpu()
        assert allowed.any() and bool((nan_rows | ~allowed).all())
    assert not out[0, 1].isnan().any()  # the other head never sees it


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES[1:])
@pytest.mark.parametrize("scale", [0.0, -0.5])
@pytest.mark.parametrize("causal", [True, False])
def test_a_zero_or_negative_scale_matches_the_reference(backend, device, scale, causal):
    # ATen's is_causal path returned NaN for scale <= 0 (the cpu backend masks explicitly there).
    inputs = [randn(1, 2, 5, 16, device=device).add(index).requires_grad_() for index in range(3)]
    results = {}
    for name in ("reference", backend):
        with mkfast.use_backend(name):
            out = attention(*inputs, causal=causal, scale=scale)
            results[name] = (out, *torch.autograd.grad(out.square().sum(), inputs))
    for got, expected in zip(results[backend], results["reference"], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "backend, device",
    [pytest.param("reference", "cpu")]
    + [pytest.param("triton", device.values[0], marks=device.marks) for device in devices_to_test()],
)
def test_decode_attention_ignores_nan_past_the_cache_lengths(backend, device):
    k_cache, v_cache = randn(2, 2, 8, 16, device=device), randn(2, 2, 8, 16, device=device)
    lengths = torch.tensor([5, 3], device=device)
    poisoned_k, poisoned_v = k_cache.clone(), v_cache.clone()
    for row, length in enumerate(lengths.tolist()):
        poisoned_k[row, :, length:] = math.nan  # what torch.empty may hold
        poisoned_v[row, :, length:] = math.nan
    query = randn(2, 2, 2, 16, device=device)
    with mkfast.use_backend(backend):
        expected = decode_attention(query, k_cache, v_cache, lengths)
        assert not expected.isnan().any()
        assert torch.equal(decode_attention(query, poisoned_k, poisoned_v, lengths), expected)


def test_attention_ops_on_meta_tensors_use_the_fake_implementations():
    q, k = torch.empty(2, 4, 8, 16, device="meta"), torch.empty(2, 2, 8, 16, device="meta")
    assert attention(q, k, k).shape == (2, 4, 8, 16)
    assert (
        attention(q, k, k, document_ids=torch.empty(2, 8, dtype=torch.int64, device="meta")).device.type
        == "meta"
    )
    lengths = torch.empty(2, dtype=torch.int32, device="meta")
    out = decode_attention(q[:, :, :1], k, k, lengths)
    assert out.shape == (2, 4, 1, 16) and out.device.type == "meta"


def test_decode_attention_without_grad_mode_returns_a_tensor_without_grad():
    with torch.no_grad():
        out = decode_attention(Q[:, :, :1].clone().requires_grad_(), CACHE, CACHE, LENGTHS)
    assert not out.requires_grad


def test_wrong_adapter_shape_loads_nothing():
    layer = small_mome_layer()
    before = {name: tensor.clone() for name, tensor in layer.adapter_state_dict().items()}
    state = {name: torch.full_like(tensor, 3.0) for name, tensor in before.items()}
    state["router.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match="router.bias"):
        layer.load_adapter_state_dict(state)
    assert all(torch.equal(layer.adapter_state_dict()[name], tensor) for name, tensor in before.items())


# --------------------------------------------------------------------------- memory files
KILLED = 137


def _memory(rows, seed=0):
    return Memory.from_arrays(randn(rows, 8) + seed, torch.arange(rows) * 3)


def _json(directory):
    return json.loads((directory / "memory.json").read_text())


def _rewrite_json(directory, **changes):
    (directory / "memory.json").write_text(json.dumps({**_json(directory), **changes}))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _tensors_path(directory):
    return directory / _json(directory)["tensors_file"]


def _elsewhere(directory):
    other = directory.parent / "other"
    _memory(2).save(other)
    return other


DAMAGED_MEMORIES = {
    "no memory.json": (
        lambda d: (d / "memory.json").unlink(),
        FileNotFoundError,
        "memory.json does not exist",
    ),
    "truncated memory.json": (
        lambda d: _truncate(d / "memory.json"),
        ValueError,
        "memory.json is not valid JSON",
    ),
    "memory.json a list": (
        lambda d: (d / "memory.json").write_text("[1, 2]"),
        ValueError,
        "memory.json must hold a JSON object, got list",
    ),
    "memory.json without tensors_file": (
        lambda d: (d / "memory.json").write_text(
            json.dumps({k: v for k, v in _json(d).items() if k != "tensors_file"})
        ),
        ValueError,
        "memory.json lacks ['tensors_file']",
    ),
    "newer format": (lambda d: _rewrite_json(d, format_version=2), ValueError, "has format_version 2"),
    "absolute tensors_file": (
        lambda d: _rewrite_json(d, tensors_file=str(_tensors_path(_elsewhere(d)))),
        ValueError,
        "must be a file name inside",
    ),
    "tensors_file outside the directory": (
        lambda d: _rewrite_json(d, tensors_file="../other/" + _json(_elsewhere(d))["tensors_file"]),
        ValueError,
        "must be a file name inside",
    ),
    "truncated tensors": (
        lambda d: _truncate(_tensors_path(d)),
        ValueError,
        "is not a readable safetensors file",
    ),
    "missing tensors": (
        lambda d: _tensors_path(d).unlink(),
        FileNotFoundError,
        "named by memory.json, does not exist",
    ),
    "sizes disagree": (lambda d: _rewrite_json(d, num_documents=5), ValueError, "memory.json says (5, 8)"),
}


@pytest.mark.parametrize("case", list(DAMAGED_MEMORIES))
def test_a_damaged_memory_fails_to_load_naming_the_file(case, tmp_path):
    damage, error, phrase = DAMAGED_MEMORIES[case]
    directory = tmp_path / "memory"
    _memory(4).save(directory)
    damage(directory)
    with pytest.raises(error) as raised:
        Memory.load(directory)
    assert phrase in str(raised.value) and str(directory) in str(raised.value)


def _save_killed_at(memory, directory, stage):
    def kill(at):
        if at == stage:
            os._exit(KILLED)

    if stage == "inside safetensors":

        def write_partly_then_die(tensors, path):
            # What a kill inside safetensors' save_file leaves: its hidden temporary file, half written.
            with open(os.path.join(os.path.dirname(path), ".tmpKILLED"), "wb") as handle:
                handle.write(b"\0" * 1000)
            os._exit(KILLED)

        import safetensors.torch

        safetensors.torch.save_file = write_partly_then_die
    else:
        memory_files.fault_point = kill
    memory.save(directory)


@pytest.mark.parametrize(
    "stage",
    ["locked", "inside safetensors", "tensors_written", "tensors_moved", "index_written", "index_replaced"],
)
def test_a_killed_save_leaves_a_loadable_memory_and_the_next_save_cleans_up(stage, tmp_path):
    directory = tmp_path / "memory"
    before, new, after = _memory(4), _memory(6, seed=1), _memory(5, seed=2)
    before.save(directory)
    # A real kill (os._exit: no finally, no cleanup) at an exact step, in a forked child.
    child = multiprocessing.get_context("fork").Process(target=_save_killed_at, args=(new, directory, stage))
    child.start()
    child.join()
    assert child.exitcode == KILLED
    expected = new if stage == "index_replaced" else before  # memory.json's replacement is the commit point
    loaded = Memory.load(directory)
    assert torch.equal(loaded.embeddings, expected.embeddings)
    assert torch.equal(loaded.document_ids, expected.document_ids)
    after.save(directory)  # not blocked: the OS released the dead save's lock
    assert torch.equal(Memory.load(directory).embeddings, after.embeddings)
    assert sorted(os.listdir(directory)) == [".memory.lock", _json(directory)["tensors_file"], "memory.json"]


# --------------------------------------------------------------------------- command line


def _run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    captured = capsys.readouterr()
    return exited.value.code, captured.err


BAD_COMMANDS = {
    "unknown command": (["nosuch"], 2, "mkfast: error: argument command: invalid choice: 'nosuch'"),
    "unknown flag": (["env", "--nosuch"], 2, "mkfast: error: unrecognized arguments: --nosuch"),
    "a word where a number belongs": (
        ["train", "racm3", "--steps", "x"],
        2,
        "mkfast: error: train racm3: argument --steps: invalid int value: 'x'",
    ),
    "compare missing folders": (
        ["bench", "--compare", "missing1", "missing2"],
        2,
        "mkfast: error: bench --compare: missing1 does not exist",
    ),
    "unknown suite": (["bench", "nosuch"], 2, "mkfast: error: bench: unknown suite 'nosuch'"),
    # Config values are checked before anything is built (the trainers' typed configs raise UsageError).
    "dtype float128": (
        ["train", "mks2-stage1", "--dtype", "float128"],
        2,
        "dtype (--dtype) must be one of ['float32', 'float16', 'bfloat16', 'float64'], got 'float128'",
    ),
    "missing language model path": (
        ["train", "mks2-stage1", "--language-model", "/nonexistent/llama"],
        2,
        "'/nonexistent/llama' does not exist (a Hugging Face hub id is written 'hf:<org>/<name>')",
    ),
    "negative steps": (["train", "racm3", "--steps", "-3"], 2, "steps (--steps) must be > 0, got -3"),
}


@pytest.mark.parametrize("case", list(BAD_COMMANDS))
def test_a_bad_command_line_prints_one_error_line(case, capsys):
    argv, code, phrase = BAD_COMMANDS[case]
    exit_code, err = _run_cli(argv, capsys)
    assert exit_code == code
    assert phrase in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_compare_of_a_folder_without_results_is_an_error(tmp_path, capsys):
    exit_code, err = _run_cli(["bench", "--compare", str(tmp_path), str(tmp_path)], capsys)
    assert exit_code == 2 and "holds no result files" in err


RAISED_WHILE_RUNNING = {
    "a clear ValueError": (
        ValueError("Memory.load: /x/memory.json is not valid JSON"),
        1,
        "mkfast: error: Memory.load: /x/memory.json is not valid JSON\n",
    ),
    "a usage error": (
        UsageError("steps must be > 0, got -3"),
        2,
        "mkfast: error: steps must be > 0, got -3\n",
    ),
    "a multi-line message": (
        FileNotFoundError("no such file\n  check the path"),
        1,
        "mkfast: error: no such file check the path\n",
    ),
    "an unexpected error": (
        ZeroDivisionError("division by zero"),
        1,
        "mkfast: error: ZeroDivisionError: division by zero (unexpected: rerun with --debug",
    ),
    "a KeyError": (KeyError("loss"), 1, "mkfast: error: KeyError: 'loss'"),
    "Ctrl-C": (KeyboardInterrupt(), 130, "mkfast: interrupted\n"),
}


@pytest.mark.parametrize("case", list(RAISED_WHILE_RUNNING))
def test_an_error_while_running_prints_one_line_and_its_exit_code(case, capsys, monkeypatch):
    error, code, expected = RAISED_WHILE_RUNNING[case]

    def fail():
        raise error

    monkeypatch.setattr(cli, "environment_report", fail)
    exit_code, err = _run_cli(["env"], capsys)
    assert exit_code == code and err.startswith(expected) and len(err.strip().splitlines()) == 1


def test_a_command_exiting_with_a_message_gets_the_error_prefix(monkeypatch):
    def exit_with_message():
        raise SystemExit("no GPU here")

    monkeypatch.setattr(cli, "environment_report", exit_with_message)
    with pytest.raises(SystemExit) as exited:  # Python prints the message and exits 1
        cli.main(["env"])
    assert exited.value.code == "mkfast: error: no GPU here"


@pytest.mark.parametrize("argv", [["--debug", "env"], ["env", "--debug"]])
def test_debug_anywhere_keeps_the_traceback(argv, monkeypatch):
    monkeypatch.setattr(cli, "environment_report", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(argv)


# --------------------------------------------------------------------------- pretrained model paths
def _record_from_pretrained(monkeypatch):
    import transformers

    calls = []

    class Stop(Exception):
        pass

    def record(source, **kwargs):
        calls.append((source, kwargs.get("local_files_only")))
        raise Stop

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record)
    return calls, Stop


@pytest.mark.parametrize("path", ["/nonexistent/llama", "./llama", "org/llama-that-is-not-here", "llama"])
def test_a_model_path_that_does_not_exist_is_an_error_not_a_hub_lookup(path, monkeypatch):
    from mkfast.mks2.build import load_llama

    calls, _ = _record_from_pretrained(monkeypatch)
    with pytest.raises(UsageError, match=f"load_llama: path '{path}' does not exist"):
        load_llama(path)
    assert calls == []  # transformers (and so the hub) never asked


def test_a_local_model_loads_offline_and_a_hub_id_only_when_written_hf(tmp_path, monkeypatch):
    from mkfast.mks2.build import load_llama

    calls, stop = _record_from_pretrained(monkeypatch)
    for value in (str(tmp_path), "hf:meta-llama/Llama-2-7b-hf"):
        with pytest.raises(stop):
            load_llama(value)
    assert calls == [(str(tmp_path), True), ("meta-llama/Llama-2-7b-hf", False)]


def test_a_vision_checkpoint_path_that_does_not_exist_is_an_error():
    from mkfast.mks2.vision import load_blip2_vision_adapter

    with pytest.raises(UsageError, match="'/nonexistent/blip2' must be a local checkpoint directory"):
        load_blip2_vision_adapter("/nonexistent/blip2", 16)

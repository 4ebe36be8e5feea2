"""Compile Triton kernels for sm_90a exactly as their launchers would launch them, with no GPU.

The launchers in mkfast.kernels run unchanged on fake CUDA tensors (torch's
FakeTensorMode: shapes, strides and dtypes, no storage) under a stand-in Triton
driver whose current target is Hopper (``GPUTarget("cuda", 90, 32)``, compiled as
sm_90a). Triton's own argument binding then specialises every launch as on an H100
(dtypes, 16-byte alignment, 16-divisible integers, constexprs, num_warps/num_stages);
Triton's ``jit_cache_hook`` captures that specialisation and skips the launch, and
the audit compiles it afterwards through ``triton.compile``, the same call the JIT makes.
An autotuned kernel is bound once per config its pruning keeps: each is one the
autotuner can pick. Nothing here repeats a kernel signature.

Kept apart from the rest of mkfast: the stand-in driver and the patched
``JITFunction.run`` / ``Autotuner.run`` exist only inside ``capture_launches()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch

SM90_CAPABILITY = 90
H100_SM_COUNT = 132  # H100 SXM5: the launchers size their split grids from it


@dataclasses.dataclass
class TensorArgument:
    """What an audit needs of a tensor argument: its dtype and how many elements it spans."""

    dtype: str
    shape: tuple[int, ...]
    span_elements: int  # 1 + sum((size - 1) * |stride|): the furthest element a kernel can address


@dataclasses.dataclass
class Launch:
    """One kernel launch as the launcher made it, specialised for sm_90a."""

    kernel: str  # qualified name, e.g. mkfast.kernels.attention:_attn_fwd_kernel
    key: str  # Triton's specialisation key: equal keys compile to the same binary
    signature: dict[str, str]
    constants: dict[str, Any]
    options: dict[str, Any]
    tensors: dict[str, TensorArgument]
    scalars: dict[str, int]  # integer arguments as launched
    grid: tuple[int, ...]
    autotune_configs: int  # configs the autotuner chooses among (1 = fixed by the launcher)
    jit_function: Any = dataclasses.field(repr=False, default=None)
    attrs: Any = dataclasses.field(repr=False, default=None)
    raw_constants: Any = dataclasses.field(repr=False, default=None)

    @property
    def name(self) -> str:
        return self.kernel.rsplit(":", 1)[-1]

    @property
    def config(self) -> str:
        """The tile and launch options in one short string: BLOCK_M=128 BLOCK_N=64 w8 s3."""
        blocks = " ".join(
            f"{name}={value}"
            for name, value in self.constants.items()
            if name.startswith("BLOCK") or name in ("POOL", "GROUP_M")
        )
        return f"{blocks} w{self.options.get('num_warps')} s{self.options.get('num_stages')}".strip()


class _Hopper:
    """Stand-in for Triton's active driver: reports an sm_90 device so binding and compiling target Hopper."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", SM90_CAPABILITY, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return "mkfast-audit-sm90"  # its own key in each JITFunction's per-device cache

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


class _HopperProperties:
    name = "NVIDIA H100 80GB HBM3 (audit stand-in)"
    major, minor = 9, 0
    multi_processor_count = H100_SM_COUNT
    total_memory = 80 * 2**30


def _span(tensor: torch.Tensor) -> int:
    if tensor.numel() == 0:
        return 0
    return 1 + sum(
        (size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )


class _TensorStandIn:
    """What Triton's binder reads of a tensor: its dtype and data pointer (alignment).

    A fresh allocation is 256-byte aligned on CUDA; a view keeps its storage offset, so an
    unaligned view specialises as unaligned, as it would on the GPU.
    """

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        self._pointer = 256 + tensor.storage_offset() * tensor.element_size()

    def data_ptr(self):
        return self._pointer


def _shapes_only_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    class ShapesOnly(FakeTensorMode):
        """Fake tensors whose data-dependent scalars read as 0 / False.

        A launcher's data checks (``bool(nan_seen.any())``, a count) then take their common
        branch (no NaN, nothing pending); a data-dependent shape (boolean-mask indexing) still
        stops the launcher, and ``record`` reports where.
        """

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                return False if args[0].dtype == torch.bool else 0
            return super().__torch_dispatch__(func, types, args, kwargs)

    return ShapesOnly


class _Recorder:
    def __init__(self):
        self.launches: list[Launch] = []
        self.pending: dict[str, TensorArgument] | None = None
        self.scalars: dict[str, int] = {}
        self.grid: tuple[int, ...] = ()
        self.autotune_configs = 1

    def hook(self, key=None, fn=None, compile=None, **_) -> bool:
        options = json.loads(compile["specialization_data"])["options"]
        kept = {
            name: options[name]
            for name in ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")
            if options.get(name) is not None
        }
        jit_function = fn.jit_function
        arg_names = jit_function.arg_names
        constants = {}
        for path, value in compile["constants"].items():
            name = arg_names[path[0]] if isinstance(path, tuple) else str(path)
            if name in arg_names and not jit_function.params[arg_names.index(name)].is_constexpr:
                continue  # an integer argument specialised (== 1): part of the key, not of the config
            constants[name] = (
                value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
            )
        self.launches.append(
            Launch(
                kernel=f"{fn.module}:{fn.name}",
                key=str(key),
                signature=dict(compile["signature"]),
                constants=constants,
                options=kept,
                tensors=dict(self.pending or {}),
                scalars=dict(self.scalars),
                grid=self.grid,
                autotune_configs=self.autotune_configs,
                jit_function=jit_function,
                attrs=compile["configs"][0],
                raw_constants=compile["constants"],
            )
        )
        return True  # skip Triton's own compile and the launch: the audit compiles it for sm_90a


@contextlib.contextmanager
def capture_launches():
    """Inside: launchers run on fake CUDA tensors and each kernel launch is recorded, not run.

    Yields the recorder; its ``launches`` fill in launch order.
    """
    from triton import knobs
    from triton.runtime import autotuner, driver, jit

    recorder = _Recorder()
    _ShapesOnly = _shapes_only_mode()
    original_run, original_autotune_run = jit.JITFunction.run, autotuner.Autotuner.run
    original_properties = torch.cuda.get_device_properties

    def run(self, *args, grid, warmup, **kwargs):
        named = dict(zip(self.arg_names, args, strict=False), **kwargs)  # defaults are not passed
        recorder.pending = {
            name: TensorArgument(str(value.dtype).replace("torch.", ""), tuple(value.shape), _span(value))
            for name, value in named.items()
            if isinstance(value, torch.Tensor)
        }
        recorder.scalars = {
            name: value
            for name, value in named.items()
            if isinstance(value, int) and not isinstance(value, bool)
        }
        size = grid(named) if callable(grid) else grid
        recorder.grid = tuple(
            int(extent) for extent in (size if isinstance(size, (tuple, list)) else (size,))
        )
        args = [_TensorStandIn(value) if isinstance(value, torch.Tensor) else value for value in args]
        kwargs = {
            name: _TensorStandIn(value) if isinstance(value, torch.Tensor) else value
            for name, value in kwargs.items()
        }
        return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def autotune_run(self, *args, **kwargs):
        # Every config pruning keeps is one the autotuner may pick: bind each (no benchmark).
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
        recorder.autotune_configs = len(configs)
        try:
            for config in configs:
                if config.pre_hook is not None:
                    config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
                self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            recorder.autotune_configs = 1

    previous_hook = knobs.runtime.jit_cache_hook
    # Put back exactly what was active (None on a machine without a GPU: reset_active() would raise).
    previous_driver = getattr(driver, "_active", None)
    driver.set_active(_Hopper())
    jit.JITFunction.run, autotuner.Autotuner.run = run, autotune_run
    torch.cuda.get_device_properties = lambda device=None: _HopperProperties()
    knobs.runtime.jit_cache_hook = recorder.hook
    try:
        with warnings.catch_warnings(), _ShapesOnly(allow_non_fake_inputs=True):
            # A TensorDescriptor's base tensor reaches Triton's binder as a FakeTensor: its data_ptr() warns.
            warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
            yield recorder
    finally:
        knobs.runtime.jit_cache_hook = previous_hook
        torch.cuda.get_device_properties = original_properties
        jit.JITFunction.run, autotuner.Autotuner.run = original_run, original_autotune_run
        driver._active = previous_driver


def compile_launch(launch: Launch):
    """The sm_90a CompiledKernel of a recorded launch (Triton's cache makes a repeat cheap)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(launch.jit_function, launch.signature, launch.raw_constants, launch.attrs)
    return triton.compile(source, target=GPUTarget("cuda", SM90_CAPABILITY, 32), options=dict(launch.options))


def record(launchers: Callable[[], None]) -> tuple[list[Launch], str | None]:
    """Run ``launchers()`` under capture; returns the launches and why it stopped early, if it did.

    A launcher that needs tensor data (a data-dependent loop) stops at that point under fake
    tensors: the launches made before it are kept and the reason returned.
    """
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    with capture_launches() as recorder:
        try:
            launchers()
        except (DataDependentOutputException, DynamicOutputShapeException) as error:
            return recorder.launches, f"stopped at a data-dependent step ({type(error).__name__})"
    return recorder.launches, None


_LAYOUT = re.compile(r"^#(\w+) = #ttg\.(\w+)<\{(?:versionMajor = (\d+))?")
_DOT = re.compile(
    r"= (ttng\.warp_group_dot|tt\.dot|tt\.dot_scaled) .*?: (?:tensor|!ttg\.memdesc)<(\d+)x(\d+)x\w+[^*]*\*"
    r".*-> tensor<(\d+)x(\d+)x(\w+), #(\w+)"
)


def dots(ttgir: str) -> list[dict]:
    """Each matrix product in the TTGIR with its shape and what it lowers to on sm_90.

    kind: "wgmma" (ttng.warp_group_dot), "mma.sync" (tt.dot on an nvidia_mma v2 layout) or
    "fma" (tt.dot left on a blocked layout: CUDA cores).
    """
    layouts = {}
    for line in ttgir.splitlines():
        match = _LAYOUT.match(line)
        if match:
            layouts[match[1]] = (match[2], int(match[3]) if match[3] else None)
    found = []
    for line in ttgir.splitlines():
        match = _DOT.search(line)
        if not match:
            continue
        if match[1] == "ttng.warp_group_dot":
            kind = "wgmma"
        else:
            layout, version = layouts.get(match[7], ("?", None))
            kind = {2: "mma.sync", 3: "wgmma"}.get(version, "fma") if layout == "nvidia_mma" else "fma"
        found.append(
            {
                "kind": kind,
                "m": int(match[4]),
                "n": int(match[5]),
                "k": int(match[3]),
                "accumulator": match[6],
            }
        )
    return found


_WGMMA_WAIT = re.compile(r"ttng\.warp_group_dot_wait .*\{pendings = (\d+) : i32\}")


def wgmma_waits(ttgir: str) -> list[int]:
    """The ``pendings`` of each wgmma wait in the TTGIR: 0 waits for every issued wgmma to finish
    (no overlap with the code after it); N > 0 lets N run on while the warps do other work."""
    return [int(match[1]) for match in _WGMMA_WAIT.finditer(ttgir)]

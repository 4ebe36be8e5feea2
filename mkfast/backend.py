"""Backend dispatch: the one mechanism every op uses to pick an implementation.

A call's backend comes from, first match wins:
  1. the innermost ``with mkfast.use_backend(name):`` block (per thread / task),
  2. the ``MKFAST_BACKEND`` environment variable (read at call time),
  3. ``"auto"``.

Names: ``auto | triton | cuda | cpu | reference``.

``auto`` walks an op's preference list for the tensors' device type and takes the
first backend that can run. It never picks the Triton interpreter on CPU tensors
(it is orders of magnitude slower than the reference); force ``triton`` with
``TRITON_INTERPRET=1`` for that, which is how CI tests the Triton kernels.

A forced backend that cannot run raises :class:`BackendUnavailableError` with the
reason; there is no silent fallback when a user asked for something specific.

Every environment flag mkfast reads is read in this module, nowhere else.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

BACKEND_NAMES = ("auto", "triton", "cuda", "cpu", "reference")
BACKEND_ENV_VAR = "MKFAST_BACKEND"

# Default preference per device type; an op may pass its own (attention prefers
# Triton on CUDA, for example). "reference" last: it always runs.
DEFAULT_AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call (missing build, wrong device...)."""


_forced_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mkfast_forced_backend", default=None
)


def _check_backend_name(name: str, source: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"{source}: backend must be one of {BACKEND_NAMES}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` for every mkfast op called inside the block.

    Autograd backward passes reuse the backend their forward picked, even
    though backward may run on another thread where this context is not set.
    """
    token = _forced_backend.set(_check_backend_name(name, "use_backend"))
    try:
        yield
    finally:
        _forced_backend.reset(token)


def requested_backend() -> str:
    """The backend name asked for right now (may be ``"auto"``)."""
    forced = _forced_backend.get()
    if forced is not None:
        return forced
    from_env = os.environ.get(BACKEND_ENV_VAR, "").strip() or "auto"
    return _check_backend_name(from_env, BACKEND_ENV_VAR)


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device``, or None if they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if triton_interpreter_enabled():
            return None
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return f"Triton kernels do not support device type {device.type!r}"


def native_unavailable_reason(native_op: str, device: torch.device) -> str | None:
    """Why the compiled op ``mkfast::<native_op>`` has no kernel for ``device``."""
    from mkfast import _extension

    missing = _extension.missing_reason()
    if missing is not None:
        return missing
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if dispatch_key is None:
        return f"no compiled kernels for device type {device.type!r}"
    qualified = f"mkfast::{native_op}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, dispatch_key):
        built = "built without CUDA" if dispatch_key == "CUDA" else "built without it"
        return f"mkfast._C has no {dispatch_key} kernel for {qualified} ({built})"
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    implementation: Callable
    unavailable_reason: Callable[[torch.device], str | None]


class OpDispatcher:
    """The backends of one op, and the choice between them for a call.

    >>> attention_backends = OpDispatcher("attention", auto_order={"cuda": ("triton", "reference")})
    >>> @attention_backends.register("reference")
    ... def _attention_reference(q, k, v): ...
    """

    def __init__(self, op_name: str, auto_order: dict[str, tuple[str, ...]] | None = None):
        self.op_name = op_name
        self.auto_order = {**DEFAULT_AUTO_ORDER, **(auto_order or {})}
        self.backends: dict[str, Backend] = {}
        _DISPATCHERS[op_name] = self

    def register(
        self,
        name: str,
        unavailable_reason: Callable[[torch.device], str | None] = lambda device: None,
    ) -> Callable[[Callable], Callable]:
        _check_backend_name(name, f"{self.op_name}.register")
        if name == "auto":
            raise ValueError(f"{self.op_name}.register: 'auto' is a choice, not a backend")

        def decorator(implementation: Callable) -> Callable:
            self.backends[name] = Backend(name, implementation, unavailable_reason)
            return implementation

        return decorator

    def _reason(self, name: str, device: torch.device) -> str | None:
        backend = self.backends.get(name)
        if backend is None:
            return f"{self.op_name} has no {name!r} backend"
        return backend.unavailable_reason(device)

    def select(self, device: torch.device, requested: str | None = None) -> Backend:
        requested = requested or requested_backend()
        if requested != "auto":
            reason = self._reason(requested, device)
            if reason is not None:
                raise BackendUnavailableError(
                    f"{self.op_name}: backend {requested!r} was forced but cannot run on "
                    f"{device.type} tensors: {reason}"
                )
            return self.backends[requested]
        for name in self.auto_order.get(device.type, ("reference",)):
            if self._reason(name, device) is None:
                return self.backends[name]
        raise BackendUnavailableError(
            f"{self.op_name}: no backend can run on {device.type} tensors"
        )

    def auto_choice(self, device: torch.device) -> str:
        try:
            return self.select(device, requested="auto").name
        except BackendUnavailableError:
            return "none"


_DISPATCHERS: dict[str, OpDispatcher] = {}


def dispatchers() -> dict[str, OpDispatcher]:
    """Every registered op's dispatcher, by op name: filled as mkfast.ops imports (``import mkfast``
    does), never imported from here, which is below the ops."""
    return dict(_DISPATCHERS)

"""The backend dispatch every op shares: names, precedence, no silent fallback."""

import pytest
import torch

import mkfast
from mkfast.backend import BackendUnavailableError, OpDispatcher, requested_backend


@pytest.fixture
def toy_dispatcher():
    dispatcher = OpDispatcher("toy_op_for_tests")
    dispatcher.register("reference")(lambda: "reference")

    def cpu_only(device):
        return None if device.type == "cpu" else "cpu tensors only"

    dispatcher.register("cpu", cpu_only)(lambda: "cpu")
    dispatcher.register("triton", lambda device: "triton is switched off in this test")(lambda: "triton")
    return dispatcher


def test_auto_prefers_compiled_cpu_over_reference(toy_dispatcher, monkeypatch):
    monkeypatch.delenv("MKFAST_BACKEND", raising=False)
    assert toy_dispatcher.select(torch.device("cpu")).name == "cpu"


def test_context_manager_overrides_environment_and_restores(toy_dispatcher, monkeypatch):
    monkeypatch.setenv("MKFAST_BACKEND", "cpu")
    with mkfast.use_backend("reference"):
        assert toy_dispatcher.select(torch.device("cpu")).name == "reference"
        with mkfast.use_backend("auto"):
            assert requested_backend() == "auto"
    assert toy_dispatcher.select(torch.device("cpu")).name == "cpu"


def test_environment_variable_forces_backend(toy_dispatcher, monkeypatch):
    monkeypatch.setenv("MKFAST_BACKEND", "reference")
    assert toy_dispatcher.select(torch.device("cpu")).name == "reference"


def test_forced_backend_that_cannot_run_raises_with_reason(toy_dispatcher):
    with mkfast.use_backend("triton"), pytest.raises(BackendUnavailableError, match="switched off"):
        toy_dispatcher.select(torch.device("cpu"))
    with mkfast.use_backend("cuda"), pytest.raises(BackendUnavailableError, match="has no 'cuda' backend"):
        toy_dispatcher.select(torch.device("cpu"))


def test_unknown_backend_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="use_backend: backend must be one of"), mkfast.use_backend("fast"):
        pass
    monkeypatch.setenv("MKFAST_BACKEND", "gpu")
    with pytest.raises(ValueError, match="MKFAST_BACKEND"):
        requested_backend()


def test_every_op_has_a_reference_backend():
    for name, dispatcher in mkfast.backend.dispatchers().items():
        assert "reference" in dispatcher.backends, name

"""`mkfast env`: versions, what the extension was built with, and what ``auto`` picks per op and device."""

from __future__ import annotations

import torch


def environment_report() -> str:
    """The report as lines of text (also the demo's environment.txt)."""
    import mkfast
    import mkfast.ops  # noqa: F401  (registers every op's dispatcher)
    from mkfast import _extension
    from mkfast.backend import dispatchers, requested_backend, triton_interpreter_enabled

    lines = [f"mkfast {mkfast.__version__}", f"torch {torch.__version__} (CUDA build: {torch.version.cuda})"]
    try:
        import triton

        interpreter = " (interpreter on)" if triton_interpreter_enabled() else ""
        lines.append(f"triton {triton.__version__}{interpreter}")
    except ImportError:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
    else:
        lines.append("GPU: none")
    parts = _extension.built_parts()
    missing = _extension.missing_reason()
    lines.append(
        "extension mkfast._C: " + (missing or f"CPU kernels {'yes' if parts['cpu'] else 'no'}, "
                                  f"CUDA kernels {'yes' if parts['cuda'] else 'no'}")
    )
    lines.append(f"requested backend: {requested_backend()}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    lines.append("auto picks:")
    for name, dispatcher in sorted(dispatchers().items()):
        if name.endswith("_for_tests"):
            continue
        picks = ", ".join(f"{device.type}: {dispatcher.auto_choice(device)}" for device in devices)
        lines.append(f"  {name:<20} {picks}   (has: {', '.join(sorted(dispatcher.backends))})")
    return "\n".join(lines)

"""`mkfast audit`: every kernel compiled for sm_90a at the target shapes, read from its machine code.

No GPU: Triton kernels compile through their own launchers on fake CUDA tensors
(triton_static.py), the CUDA sources through nvcc (cuda_static.py). The report
(report.py) gives registers, spills and whether they sit in a loop, shared memory,
how each matrix product lowers (wgmma or mma.sync) and how many run per loop
iteration, cp.async/TMA loads and 64-bit address arithmetic; rules.py holds the gate's
rules and shortfalls.py the one table of kernels that miss one yet. A static proxy
read from machine code, not a GPU measurement.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags (``mkfast audit`` and ``python -m mkfast.audit`` share them)."""
    parser.add_argument("--target", default="sm90a", help="architecture compiled for (only sm90a)")
    parser.add_argument("--kernels", nargs="*", help="groups: attention decode mome topk cuda (default: all)")
    parser.add_argument("--json", help="write the JSON result here")
    parser.add_argument("--markdown", help="write the Markdown table here")
    parser.add_argument(
        "--save",
        action="store_true",
        help="write both to benchmarks/results/sm90_static/triton-<version>/ (the committed table)",
    )


def run_from_arguments(arguments: argparse.Namespace) -> dict:
    return main(arguments.target, arguments.kernels, arguments.json, arguments.markdown, arguments.save)


def main(
    target: str = "sm90a",
    kernels: list[str] | None = None,
    json_path: str | None = None,
    markdown_path: str | None = None,
    save: bool = False,
) -> dict:
    """Run, print the Markdown table, write JSON/Markdown where asked. Returns the result."""
    from mkfast.audit import core, report, targets

    if target != core.SM90_TARGET:
        raise SystemExit(
            f"audit: --target must be {core.SM90_TARGET!r} (the only target audited), got {target!r}"
        )
    unknown = sorted(set(kernels or ()) - set(targets.GROUPS))
    if unknown:
        raise SystemExit(f"audit: --kernels takes {', '.join(targets.GROUPS)}, got {', '.join(unknown)}")
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, never interpret
    result = core.run_audit(kernels or None, log=lambda message: print(message, flush=True))
    if save:
        json_path, markdown_path = report.saved_paths(result["versions"]["triton"])
    report.write(result, json_path, markdown_path)
    print(report.markdown(result))
    return result

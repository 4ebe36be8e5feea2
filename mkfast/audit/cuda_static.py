"""CUDA sources (csrc/cuda/*.cu) compiled for sm_90a by nvcc with ``-Xptxas -v``, read like Triton's.

Compiled with the flags setup.py builds the extension with (``-O3 --use_fast_math``, C++20,
torch's headers), to a cubin for sm_90a only; every kernel instantiation of a bf16 (or
dtype-free) template is audited. What a Triton launch records and a CUDA one cannot
(the grid, the integer arguments) is missing here: the 64-bit offset rule is not read
for these kernels, and dynamic shared memory (a launch argument) is reported as 0.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import tempfile

from mkfast.audit import sass

NVCC_FLAGS = [
    "-O3",
    "-std=c++20",
    "--use_fast_math",
    "-lineinfo",
    "-DMKFAST_WITH_CUDA",
    "-arch=sm_90a",
    "-Xptxas",
    "-v",
]
_PTXAS_SPILLS = re.compile(
    r"Function properties for (\S+)\n\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads"
)


def _sources_root() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return root if os.path.isdir(os.path.join(root, "csrc", "cuda")) else None


def _demangle(names: list[str]) -> dict[str, str]:
    try:
        output = subprocess.run(
            ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
        )
        return dict(zip(names, output.stdout.splitlines(), strict=True))
    except (OSError, subprocess.CalledProcessError):
        return {name: name for name in names}


def _short(demangled: str) -> str:
    """``void mkfast::(anonymous namespace)::_kernel<c10::BFloat16>(...)`` -> ``_kernel<BFloat16>``."""
    match = re.search(r"(\w+)(<[^()]*>)?\((?!anonymous)", demangled)
    return (match[1] + (match[2] or "")).replace("c10::", "") if match else demangled


def _other_dtype(name: str) -> bool:
    """An instantiation for a dtype other than bf16 (the audit's dtype); dtype-free kernels are kept."""
    template = name[name.find("<") :] if "<" in name else ""
    return bool(template) and "BFloat16" not in template


def compile_source(path: str, root: str) -> tuple[bytes, str]:
    """(cubin, ptxas -v log) of one .cu for sm_90a."""
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{directory}" for directory in [os.path.join(root, "csrc"), *include_paths()]]
    with tempfile.TemporaryDirectory() as directory:
        cubin = os.path.join(directory, "out.cubin")
        completed = subprocess.run(
            [sass.tool("nvcc") or "nvcc", "-cubin", "-o", cubin, *NVCC_FLAGS, *includes, path],
            capture_output=True,
            text=True,
        )
        if completed.returncode != 0:
            raise RuntimeError(completed.stderr[-2000:])
        with open(cubin, "rb") as handle:
            return handle.read(), completed.stdout + completed.stderr


def audit_sources(log) -> tuple[list[dict], str | None]:
    """Audit records of every bf16 kernel in csrc/cuda/*.cu, and a note when nothing could be compiled."""
    root = _sources_root()
    if root is None:
        return [], "CUDA sources: csrc/cuda not found (installed without the sources)"
    if sass.tool("nvcc") is None:
        return [], "CUDA sources: no nvcc"
    records = []
    for path in sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cu"))):
        log(f"compiling {os.path.relpath(path, root)} for sm_90a (nvcc -Xptxas -v)")
        source = os.path.basename(path)
        try:
            cubin, ptxas_log = compile_source(path, root)
        except RuntimeError as error:
            records.append(
                {
                    "kernel": source,
                    "group": "cuda",
                    "config": "nvcc -O3",
                    "constants": {},
                    "autotune_configs": 1,
                    "language": "cuda",
                    "error": str(error).splitlines()[-1][:200],
                }
            )
            continue
        spills = {match[1]: (int(match[3]), int(match[4])) for match in _PTXAS_SPILLS.finditer(ptxas_log)}
        functions = sass.analyse_cubin(cubin)
        names = _demangle(list(functions))
        for mangled, function in functions.items():
            if _other_dtype(_short(names[mangled])):
                continue
            records.append(
                {
                    "kernel": _short(names[mangled]),
                    "group": "cuda",
                    "config": f"{source} nvcc -O3",
                    "constants": {},
                    "targets": [f"{source} (shape-independent compile)"],
                    "autotune_configs": 1,
                    "language": "cuda",
                    **sass.record_fields(function, dynamic_shared=0),
                    "ptxas_spill_bytes": list(spills.get(mangled, (0, 0))),
                    "dots": [],
                    "offsets": {
                        "large_tensors": [],
                        "findings": [],
                        "not_read": "no launch values for CUDA kernels",
                    },
                }
            )
    return records, None

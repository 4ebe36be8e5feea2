"""Read Hopper SASS and resource usage from a cubin: loops, matrix instructions, spills, async loads.

Needs ``nvdisasm`` and ``cuobjdump`` (Triton's NVIDIA backend ships both; a CUDA
toolkit on PATH works too). Loops are found from backward branches: a ``BRA`` to an
address at or before itself closes a loop spanning [target, branch]. Code the compiler
places out of line after a loop's back edge is not counted in it, and a block placed
inside the span that is not part of the loop would be: a range reading, exact for the
straight-line loop bodies Triton and nvcc emit here.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile

# Instruction classes counted per loop and per function (opcode prefixes, SASS names).
WGMMA = ("HGMMA",)  # Hopper warpgroup MMA (wgmma.mma_async)
MMA_SYNC = ("HMMA",)  # warp-level mma.sync (Ampere style)
CP_ASYNC = ("LDGSTS",)  # cp.async: global -> shared, bypassing registers
TMA = ("UTMALDG", "UTMAPF", "UBLKCP")  # tensor-memory accelerator / bulk copies (cp.async.bulk*)
SPILL_STORE, SPILL_LOAD = "STL", "LDL"  # local memory: ptxas spills (no local arrays in these kernels)

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_FUNCTION = re.compile(r"^//-+ \.text\.(\S+)\s+-+")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_RESOURCES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@functools.cache
def tool(name: str) -> str | None:
    """Path of an NVIDIA binary tool: Triton's bundled copy first, then PATH."""
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    return shutil.which(name)


def _run_on_cubin(arguments: list[str], cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        completed = subprocess.run([*arguments, handle.name], capture_output=True, text=True, check=True)
    return completed.stdout


def resource_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """Per function: registers, stack, static shared and local bytes (cuobjdump -res-usage)."""
    text = _run_on_cubin([tool("cuobjdump"), "-res-usage"], cubin)
    return {
        match[1]: {
            "registers": int(match[2]),
            "stack": int(match[3]),
            "static_shared": int(match[4]),
            "local": int(match[5]),
        }
        for match in _RESOURCES.finditer(text)
    }


def _width(opcode: str) -> int:
    """Bytes moved by an LDL/STL: .64 / .128 suffixes, .U8/.S16 sub-word, else 4."""
    for suffix, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in opcode:
            return size
    return 4


def _opcode(text: str) -> str:
    parts = text.split()
    return parts[1] if parts and parts[0].startswith("@") and len(parts) > 1 else (parts[0] if parts else "")


def _count(instructions, prefixes) -> int:
    return sum(1 for _, text in instructions if _opcode(text).split(".")[0] in prefixes)


def _bytes(instructions, prefix: str) -> int:
    return sum(_width(_opcode(text)) for _, text in instructions if _opcode(text).split(".")[0] == prefix)


def split_functions(sass: str) -> dict[str, tuple[list[tuple[int, str]], dict[str, int]]]:
    """Per function: [(address, instruction)] and {label: address of the next instruction}."""
    functions: dict[str, tuple[list, dict]] = {}
    current, pending_labels = None, []
    for line in sass.splitlines():
        header = _FUNCTION.match(line.strip())
        if header:
            current = header[1]
            functions[current] = ([], {})
            continue
        if current is None:
            continue
        label = _LABEL.match(line.strip())
        if label:
            pending_labels.append(label[1])
            continue
        instruction = _INSTRUCTION.search(line)
        if instruction:
            address = int(instruction[1], 16)
            functions[current][0].append((address, instruction[2]))
            for name in pending_labels:
                functions[current][1][name] = address
            pending_labels = []
    return functions


def _summary(instructions) -> dict[str, int]:
    return {
        "wgmma": _count(instructions, WGMMA),
        "mma_sync": _count(instructions, MMA_SYNC),
        "cp_async": _count(instructions, CP_ASYNC),
        "tma": _count(instructions, TMA),
        "spill_store_bytes": _bytes(instructions, SPILL_STORE),
        "spill_load_bytes": _bytes(instructions, SPILL_LOAD),
    }


def analyse_function(instructions: list[tuple[int, str]], labels: dict[str, int]) -> dict:
    """Whole-function counts, and per loop (innermost first) the same counts for one iteration."""
    spans = set()
    for address, text in instructions:
        branch = _BRANCH.search(text)
        if branch and labels.get(branch[1], address) < address:  # BRA to itself: the trap at the end
            spans.add((labels[branch[1]], address))
    loops = []
    for start, end in sorted(spans, key=lambda span: (span[1] - span[0], span[0])):
        body = [(address, text) for address, text in instructions if start <= address <= end]
        inner = any(other != (start, end) and start <= other[0] and other[1] <= end for other in spans)
        loops.append(
            {"start": start, "end": end, "instructions": len(body), "innermost": not inner, **_summary(body)}
        )
    in_loop = [
        (address, text)
        for address, text in instructions
        if any(start <= address <= end for start, end in spans)
    ]
    return {
        **_summary(instructions),
        "instructions": len(instructions),
        "loops": loops,
        "spill_in_loop_bytes": _bytes(in_loop, SPILL_STORE) + _bytes(in_loop, SPILL_LOAD),
    }


def analyse_cubin(cubin: bytes) -> dict[str, dict]:
    """Per function of the cubin: resource usage plus the SASS analysis (see analyse_function)."""
    resources = resource_usage(cubin)
    sass = _run_on_cubin([tool("nvdisasm"), "-c"], cubin)
    result = {}
    for name, (instructions, labels) in split_functions(sass).items():
        result[name] = {**resources.get(name, {}), **analyse_function(instructions, labels)}
    return result


LOOP_FIELDS = (
    "wgmma",
    "mma_sync",
    "cp_async",
    "tma",
    "spill_store_bytes",
    "spill_load_bytes",
    "instructions",
)


def record_fields(function: dict, dynamic_shared: int) -> dict:
    """The audit record's machine-code fields from analyse_cubin's entry for one function.

    ``loops`` keeps the innermost loops that run matrix instructions or spill: one iteration each.
    """
    from mkfast.audit import rules

    return {
        "registers": function.get("registers"),
        "spill_store_bytes": function["spill_store_bytes"],
        "spill_load_bytes": function["spill_load_bytes"],
        "spill_in_loop_bytes": function["spill_in_loop_bytes"],
        "stack_bytes": function.get("stack"),
        **rules.shared_memory(function.get("static_shared", 0), dynamic_shared),
        **{name: function[name] for name in ("wgmma", "mma_sync", "cp_async", "tma")},
        "loops": [
            {name: loop[name] for name in LOOP_FIELDS}
            for loop in function["loops"]
            if loop["innermost"]
            and any(loop[name] for name in ("wgmma", "mma_sync", "spill_store_bytes", "spill_load_bytes"))
        ],
    }

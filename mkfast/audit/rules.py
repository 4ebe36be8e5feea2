"""The gate's rules over an audited kernel: what the machine code must show at the target shapes.

  spill-in-loop   no local-memory load/store (ptxas spill) inside a loop
  wgmma           every tl.dot with M >= 64 lowered to a Hopper wgmma (not mma.sync or FMA)
  shared-memory   static + dynamic shared memory within an H100's 227 KiB per block
  64-bit-offsets  no 32-bit address arithmetic that wraps at the audited shapes, nor a 32-bit
                  multiply of an unbounded value by an integer argument, on a tensor spanning
                  >= 2^31 elements (ptx.py)
  compiles        the launcher runs under the audit and the kernel compiles for sm_90a

A config the autotuner can skip (it refuses a kernel over the shared-memory limit with
OutOfResources and benchmarks the others) is not held to the rules: it is marked
``unpickable`` instead. Each violation is (kernel, config, rule, figure).
"""

from __future__ import annotations

from mkfast.audit.ptx import FAILING

H100_SHARED_MEMORY_BYTES = 227 * 1024  # per block, opt-in maximum (cudaDevAttrMaxSharedMemoryPerBlockOptin)
# sm_90 reserves 1 KiB of shared memory per block for the system (.nv.reservedSmem): cuobjdump
# counts it in a kernel's static shared memory, the 227 KiB a block may use excludes it.
SM90_RESERVED_SHARED_BYTES = 1024
WGMMA_MIN_M = 64  # a warpgroup MMA computes 64 rows: a narrower dot cannot use it


def shared_memory(static_bytes: int, dynamic_bytes: int) -> dict[str, int]:
    """static (the kernel's own, reserved KiB excluded), dynamic and their total, per block."""
    static_bytes = max(0, static_bytes - SM90_RESERVED_SHARED_BYTES)
    return {
        "static_shared": static_bytes,
        "dynamic_shared": dynamic_bytes,
        "shared_total": static_bytes + dynamic_bytes,
    }


def unpickable(record: dict) -> bool:
    """An autotune config over the shared-memory limit: the autotuner never runs it on an H100."""
    return record["autotune_configs"] > 1 and record["shared_total"] > H100_SHARED_MEMORY_BYTES


def violations(record: dict) -> list[tuple[str, str, str, str]]:
    """[(kernel, config, rule, measured figure)] for one audited kernel record."""
    if record.get("error") or unpickable(record):
        return (
            [(record["kernel"], record["config"], "compiles", record["error"])] if record.get("error") else []
        )
    found = []
    if record["spill_in_loop_bytes"]:
        found.append(("spill-in-loop", f"{record['spill_in_loop_bytes']} B/thread of spill ld/st in loops"))
    narrow = [dot for dot in record["dots"] if dot["m"] >= WGMMA_MIN_M and dot["kind"] != "wgmma"]
    if narrow:
        shapes = ", ".join(sorted({f"{dot['kind']} {dot['m']}x{dot['n']}x{dot['k']}" for dot in narrow}))
        found.append(
            ("wgmma", f"{sum(dot['count'] for dot in narrow)} dots with M >= 64 not wgmma: {shapes}")
        )
    if record["shared_total"] > H100_SHARED_MEMORY_BYTES:
        found.append(("shared-memory", f"{record['shared_total']} B > {H100_SHARED_MEMORY_BYTES} B"))
    offsets = [finding for finding in record["offsets"]["findings"] if finding["status"] in FAILING]
    if offsets:
        tensors = sorted({tensor for finding in offsets for tensor in finding["tensors"]})
        statuses = sorted({finding["status"] for finding in offsets})
        found.append(
            (
                "64-bit-offsets",
                f"{len(offsets)} 32-bit address ops ({'/'.join(statuses)}) on {', '.join(tensors)}",
            )
        )
    return [(record["kernel"], record["config"], rule, figure) for rule, figure in found]

"""The audit's Markdown table and JSON, and its comparison with the known-shortfall table."""

from __future__ import annotations

import json
import os

from mkfast.audit import rules
from mkfast.audit.ptx import FAILING
from mkfast.audit.shortfalls import applicable, minor_version

RESULTS_DIRECTORY = os.path.join("benchmarks", "results", "sm90_static")

FIELDS = """Columns: registers per thread; spill = bytes/thread of local-memory stores/loads in the SASS
(ptxas spills), "in loop" when any sits inside a loop; smem = static + dynamic shared memory per block
(the 1 KiB sm_90 reserves per block left out, as the 227 KiB limit leaves it out);
dots = each tl.dot's lowering (wgmma / mma.sync / fma) and M x N x K, with its count in the TTGIR, and
the wgmma waits' allowance (0 pending: the warps stop until every wgmma issued so far has finished,
so the code after the wait cannot overlap them);
loop MMAs = wgmma (HGMMA) + mma.sync (HMMA) instructions per iteration of each innermost loop holding
any; async = cp.async (LDGSTS) and TMA/bulk-copy instructions; 64-bit = whether all address arithmetic
on tensors spanning >= 2^31 elements is 64-bit or provably in int32 range ("n/a": no such tensor)."""


def compare_with_shortfalls(records: list[dict], versions: dict) -> dict:
    """{"unlisted": violations not in the table, "stale": rows no longer true, "listed": rows still true}.

    Only the rows measured with the running Triton minor version apply (shortfalls.applicable).
    """
    measured = {}
    for record in records:
        for violation in rules.violations(record):
            measured[violation[:3]] = violation[3]
    table = {shortfall.key: shortfall for shortfall in applicable(versions.get("triton", ""))}
    audited = {(record["kernel"], record["config"]) for record in records}
    unlisted = [list(key) + [figure] for key, figure in measured.items() if key not in table]
    stale, listed = [], []
    for key, shortfall in table.items():
        if key[:2] not in audited:
            continue  # a kernel not audited in this run (--kernels) or no longer launched: see the gate test
        if measured.get(key) != shortfall.figure:
            stale.append(list(key) + [shortfall.figure, measured.get(key, "no longer fails")])
        else:
            listed.append(list(key) + [measured[key], shortfall.reason])
    return {"unlisted": unlisted, "stale": stale, "listed": listed}


def _dots(record: dict) -> str:
    text = "; ".join(
        f"{dot['count']}x {dot['kind']} {dot['m']}x{dot['n']}x{dot['k']}" for dot in record["dots"]
    )
    if record.get("wgmma_wait_pendings"):
        text += (
            " (waits: " + ", ".join(str(pending) for pending in record["wgmma_wait_pendings"]) + " pending)"
        )
    return text or "-"


def _loops(record: dict) -> str:
    return (
        "; ".join(
            f"{loop['wgmma']}+{loop['mma_sync']}"
            for loop in record["loops"]
            if loop["wgmma"] or loop["mma_sync"]
        )
        or "-"
    )


def _offsets(record: dict) -> str:
    offsets = record["offsets"]
    if offsets.get("not_read"):
        return "not read"
    if not offsets["large_tensors"]:
        return "n/a"
    failing = [finding for finding in offsets["findings"] if finding["status"] in FAILING]
    unproven = len(offsets["findings"]) - len(failing)
    note = f"; {unproven} int32 sums unproven" if unproven else ""
    if not failing:
        return "yes (" + ", ".join(offsets["large_tensors"]) + note + ")"
    return f"**no**: {len(failing)} int32 ops{note}"


def _row(record: dict) -> str:
    config = record["config"] + (
        f" (1 of {record['autotune_configs']} autotuned)" if record["autotune_configs"] > 1 else ""
    )
    if record.get("error"):
        return f"| {record['kernel']} | {config} | compile error: {record['error']} |" + " |" * 7
    spill = f"{record['spill_store_bytes']}/{record['spill_load_bytes']}"
    if record["spill_in_loop_bytes"]:
        spill += f" **in loop ({record['spill_in_loop_bytes']})**"
    if record.get("ptx_local_accesses"):
        spill += f" (PTX .local: {record['ptx_local_accesses']})"
    shared = f"{record['static_shared']}+{record['dynamic_shared']}"
    if record["unpickable"]:
        shared += " (over 227 KiB: the autotuner skips it)"
    rules_failed = ", ".join(violation[0] for violation in record["violations"]) or "ok"
    return (
        f"| {record['kernel']} | {config} | {record['registers']} | {spill} | {shared} | {_dots(record)} | "
        f"{_loops(record)} | {record['cp_async']} / {record['tma']} | {_offsets(record)} | {rules_failed} |"
    )


def markdown(result: dict) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in result["versions"].items())
    lines = [
        f"# sm_90a static audit ({versions})",
        "",
        "Read from the machine code ptxas/nvcc produce for sm_90a at the target shapes: a static proxy, "
        "not a GPU measurement. Regenerate with `mkfast audit` (or `make audit`).",
        "",
        FIELDS,
        "",
    ]
    for group in dict.fromkeys(record["group"] for record in result["records"]):
        lines += [
            f"## {group}",
            "",
            "| kernel | config | regs | spill st/ld B | smem B | dots | loop MMAs (wgmma+mma.sync) "
            "| cp.async / TMA | 64-bit | rules failed |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [_row(record) for record in result["records"] if record["group"] == group]
        targets = sorted(
            {
                name
                for record in result["records"]
                if record["group"] == group
                for name in record.get("targets", [])
            }
        )
        lines += ["", "Targets: " + "; ".join(targets), ""]
    comparison = result["shortfalls"]
    lines += ["## Known shortfalls (mkfast/audit/shortfalls.py)", ""]
    if comparison["listed"]:
        lines += ["| kernel | config | rule | measured | reason |", "|---|---|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in comparison["listed"]]
    elif not comparison["unlisted"]:
        lines += ["None: every audited kernel meets every rule."]
    if comparison["unlisted"]:
        lines += ["", "**Violations not in the shortfall table:**", ""]
        lines += [f"- {' / '.join(row)}" for row in comparison["unlisted"]]
    if comparison["stale"]:
        lines += ["", "**Shortfall rows no longer true (listed figure, measured):**", ""]
        lines += [f"- {' / '.join(row)}" for row in comparison["stale"]]
    if result["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def saved_paths(triton_version: str) -> tuple[str, str]:
    """Where --save writes: one folder per Triton minor version (the GPU machines run 3.6, this venv 3.8)."""
    folder = os.path.join(RESULTS_DIRECTORY, f"triton-{minor_version(triton_version)}")
    return os.path.join(folder, "audit.json"), os.path.join(folder, "audit.md")


def write(result: dict, json_path: str | None = None, markdown_path: str | None = None) -> None:
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as handle:
            json.dump(result, handle, indent=1, sort_keys=False)
            handle.write("\n")
    if markdown_path:
        os.makedirs(os.path.dirname(os.path.abspath(markdown_path)), exist_ok=True)
        with open(markdown_path, "w") as handle:
            handle.write(markdown(result))

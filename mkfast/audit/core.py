"""Run the audit: record every target's launches, compile each distinct kernel once for sm_90a, read it."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import importlib
import json
import multiprocessing
import os
import re
import sys
import time

from mkfast.audit import ptx, report, rules, sass, targets
from mkfast.audit.triton_static import Launch, compile_launch, dots, record, wgmma_waits

SM90_TARGET = "sm90a"


def _pointer_and_scalar_parameters(launch: Launch):
    """PTX parameter index -> pointer name, and -> integer as launched (constexprs are no parameters)."""
    names = [name for name, kind in launch.signature.items() if kind != "constexpr"]
    pointers = {index: name for index, name in enumerate(names) if launch.signature[name].startswith("*")}
    scalars = {index: launch.scalars[name] for index, name in enumerate(names) if name in launch.scalars}
    return pointers, scalars


def _summarise_dots(found: list[dict]) -> list[dict]:
    counts = collections.Counter((dot["kind"], dot["m"], dot["n"], dot["k"]) for dot in found)
    return [
        {"kind": kind, "m": m, "n": n, "k": k, "count": count}
        for (kind, m, n, k), count in sorted(counts.items())
    ]


def analyse(launch: Launch, spans: dict[str, int], group: str, target_names: list[str]) -> dict:
    """The audit record of one compiled kernel (see report.py for the fields' meaning)."""
    base = {
        "kernel": launch.name,
        "group": group,
        "config": launch.config,
        "constants": launch.constants,
        "targets": target_names,
        "autotune_configs": launch.autotune_configs,
        "language": "triton",
    }
    try:
        compiled = compile_launch(launch)
    except Exception as error:  # a compile failure is itself a finding: keep auditing the rest
        return {**base, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    functions = sass.analyse_cubin(compiled.asm["cubin"])
    function = functions.get(launch.name) or next(iter(functions.values()))
    pointers, scalars = _pointer_and_scalar_parameters(launch)
    large = {name for name, span in spans.items() if span >= ptx.LARGE_TENSOR_ELEMENTS}
    grid = tuple(launch.grid) + (1,) * (3 - len(launch.grid))
    findings = ptx.offset_findings(
        compiled.asm["ptx"], pointers, scalars, grid, 32 * launch.options.get("num_warps", 4), large
    )
    dynamic = compiled.metadata.shared
    return {
        **base,
        **sass.record_fields(function, dynamic),
        "dots": _summarise_dots(dots(compiled.asm["ttgir"])),
        "wgmma_wait_pendings": sorted(set(wgmma_waits(compiled.asm["ttgir"]))),
        # Local memory the PTX itself uses (a local array), not ptxas spills: both are LDL/STL in SASS.
        "ptx_local_accesses": len(re.findall(r"\b(?:ld|st)\.local\b", compiled.asm["ptx"])),
        "offsets": {"large_tensors": sorted(large), "findings": findings},
    }


MAX_WORKERS = 8  # compiles run in parallel processes: ptxas and the readings are single-threaded


def _resolve(kernel: str):
    """The JITFunction ``module:name`` names (an autotuned or heuristics kernel wraps it in .fn)."""
    from triton.runtime.jit import JITFunction

    module, name = kernel.rsplit(":", 1)
    found = getattr(importlib.import_module(module), name)
    while not isinstance(found, JITFunction):
        found = found.fn
    return found


def _analyse_detached(launch: Launch, spans: dict[str, int], group: str, target_names: list[str]) -> dict:
    """analyse() in a worker process: the kernel is looked up again by name there."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))
    launch.jit_function = _resolve(launch.kernel)
    return analyse(launch, spans, group, target_names)


def _analyse_all(jobs: list[tuple], log) -> list[dict]:
    """analyse() every job, in up to MAX_WORKERS spawned processes (one per core), in order."""
    workers = min(len(jobs), os.cpu_count() or 1, MAX_WORKERS)
    for launch, *_ in jobs:
        log(f"compiling {launch.name} [{launch.config}] for sm_90a")
    if workers <= 1:
        return [analyse(*job) for job in jobs]
    detached = [(dataclasses.replace(launch, jit_function=None), *rest) for launch, *rest in jobs]
    context = multiprocessing.get_context("spawn")  # no fork of a process holding Triton/MLIR state
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(_analyse_detached, *zip(*detached, strict=True)))


def run_audit(groups: list[str] | None = None, log=None) -> dict:
    """Audit the targets of ``groups`` (default all). Returns {"records", "notes", "versions", "seconds"}."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))  # def-use walks over long PTX chains
    log = log or (lambda message: None)
    started = time.time()
    chosen = [target for target in targets.targets() if groups is None or target.group in groups]
    by_key: dict[str, dict] = {}
    notes, failed = [], []
    for target in chosen:
        try:
            launches, stopped = record(target.launch)
        except Exception as error:  # a launcher that no longer runs is a finding; audit the others
            message = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            failed.append(
                {
                    "kernel": target.name,
                    "group": target.group,
                    "config": "launcher",
                    "constants": {},
                    "targets": [target.name],
                    "autotune_configs": 1,
                    "language": "triton",
                    "error": f"the launcher failed under the audit: {message}",
                }
            )
            continue
        if stopped:
            notes.append(f"{target.name}: {stopped}; {len(launches)} launches recorded before it")
        for launch in launches:
            entry = by_key.setdefault(
                launch.key, {"launch": launch, "group": target.group, "targets": [], "spans": {}}
            )
            if target.name not in entry["targets"]:
                entry["targets"].append(target.name)
            for name, tensor in launch.tensors.items():
                if tensor.span_elements > entry["spans"].get(name, 0):
                    entry["spans"][name] = tensor.span_elements
                    if tensor.span_elements >= ptx.LARGE_TENSOR_ELEMENTS:
                        entry["launch"] = launch  # the offsets are read with the large launch's values
    jobs = [(entry["launch"], entry["spans"], entry["group"], entry["targets"]) for entry in by_key.values()]
    records = failed + _analyse_all(jobs, log)
    if groups is None or "cuda" in groups:
        from mkfast.audit import cuda_static

        cuda_records, cuda_note = cuda_static.audit_sources(log)
        records += cuda_records
        if cuda_note:
            notes.append(cuda_note)
    for item in records:
        item["violations"] = [list(violation[2:]) for violation in rules.violations(item)]
        item["unpickable"] = "error" not in item and rules.unpickable(item)
    result = {
        "target": SM90_TARGET,
        "records": _merge_specialisations(records),
        "notes": notes,
        "versions": versions(),
    }
    result["shortfalls"] = report.compare_with_shortfalls(result["records"], result["versions"])
    result["seconds"] = round(time.time() - started, 1)
    return result


def _merge_specialisations(records: list[dict]) -> list[dict]:
    """One record per (kernel, config): launches differing only in integer specialisation (an
    argument equal to 1 or divisible by 16) compile separately; the one with the most violations
    (then the most tensors read by the 64-bit rule, then the most spill) stands for them, with
    every target that launched any of them."""
    merged: dict[tuple[str, str], dict] = {}
    for item in records:
        key = (item["kernel"], json.dumps(item["constants"], sort_keys=True, default=str))
        if key not in merged:
            merged[key] = item
            continue
        kept = merged[key]

        def weight(record):
            return (
                len(record["violations"]),
                len(record.get("offsets", {}).get("large_tensors", [])),
                record.get("spill_store_bytes", 0),
            )

        worse = weight(item) > weight(kept)
        targets_seen = list(dict.fromkeys(kept.get("targets", []) + item.get("targets", [])))
        merged[key] = {**(item if worse else kept), "targets": targets_seen}
    # Variants of one tile (GATED=True/False) keep their own row: the differing constexprs join the config.
    by_config = collections.defaultdict(list)
    for item in merged.values():
        by_config[(item["kernel"], item["config"])].append(item)
    for variants in by_config.values():
        if len(variants) > 1:
            names = sorted(
                {
                    name
                    for item in variants
                    for name in item["constants"]
                    if len({str(other["constants"].get(name)) for other in variants}) > 1
                }
            )
            for item in variants:
                item["config"] += "".join(f" {name}={item['constants'].get(name)}" for name in names)
    return list(merged.values())


def versions() -> dict[str, str]:
    import subprocess

    import torch
    import triton

    found = {"triton": triton.__version__, "torch": torch.__version__}
    for name in ("ptxas", "nvcc"):
        path = sass.tool(name)
        if path:
            output = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
            release = [line for line in output.splitlines() if "release" in line]
            found[name] = release[-1].split("release")[-1].strip(" ,") if release else output.strip()[-40:]
    return found

"""The one benchmark runner: timing, device naming, results as JSON + Markdown + PNG.

Every benchmark file defines one setup function shared by all its providers
(ours, the eager reference, the peer library), builds a list of cases, and
calls :func:`run_suite`. Results land in ``benchmarks/results/<device>/``:
``<suite>.json`` (raw timings of every repetition, device, versions, commit),
``<suite>.md`` (the table rendered from that JSON) and ``<suite>.png`` (plot).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# Relative to the working directory, like the audit's tables: in a checkout that is the committed
# benchmarks/results; from an installed wheel it is not a folder inside site-packages.
RESULTS_DIR = os.path.join("benchmarks", "results")

# Dense bf16 tensor-core peak and HBM bandwidth per device (vendor data sheets): used only
# to report "fraction of peak" next to measured numbers. "h100" is the SXM part.
DEVICE_PEAKS = {
    "h100": {"tflops_bf16": 989.0, "hbm_gbps": 3350.0},
    "h100_pcie": {"tflops_bf16": 756.0, "hbm_gbps": 2000.0},
    "h100_nvl": {"tflops_bf16": 835.0, "hbm_gbps": 3900.0},
    "h200": {"tflops_bf16": 989.0, "hbm_gbps": 4800.0},
}


RATE_LABELS = {"tflops": "TFLOP/s", "gbps": "GB/s", "tokens": "tokens/s"}
PEAK_KEYS = {"tflops": "tflops_bf16", "gbps": "hbm_gbps"}
# Case sets a suite's main(cases=...) may take besides its default grid (see command_line).
CASE_SETS = ("target", "tiny")


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """The device a suite runs on: the one asked for, else the GPU where there is one."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_tag(device: torch.device | str | None = None) -> str:
    """Folder name of a device: ``h100``, ``h200``, another GPU's short name, or ``cpu``."""
    device = resolve_device(device)
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for tag in ("h100", "h200", "a100", "l40s", "b200"):
        if tag in name:
            # The PCIe and NVL H100s have other peaks than the SXM part: their own folder and row.
            variant = next((f"_{kind}" for kind in ("pcie", "nvl") if tag == "h100" and kind in name), "")
            return tag + variant
    return name.replace(" ", "_")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True,
            stderr=subprocess.DEVNULL,
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    return versions


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repetitions: int = 10,
            min_seconds: float = 0.0) -> list[float]:
    """Milliseconds of each of ``repetitions`` calls of ``fn`` after ``warmup`` calls.

    CUDA timings use events around each call (kernel time on the stream); CPU
    timings use perf_counter. ``min_seconds`` keeps repeating until that much
    time was spent, so short kernels are not judged on one noisy sample.
    """
    for _ in range(warmup):
        fn()
    timings: list[float] = []
    spent = 0.0
    while len(timings) < repetitions or spent < min_seconds:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            elapsed = start.elapsed_time(end)
        else:
            began = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - began) * 1e3
        timings.append(elapsed)
        spent += elapsed / 1e3
    return timings


def interleaved_timings(calls: dict[str, Callable[[], object]], device: torch.device, *, warmup_rounds: int,
                        repetitions: int) -> dict[str, list[float]]:
    """Milliseconds per provider, measured round-robin: one call of each provider per round.

    On a shared machine every provider then sees the same background load, so the
    ratios between them stay meaningful even when absolute times drift.
    """
    timings: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(warmup_rounds + repetitions):
        for name, call in calls.items():
            timing = measure(call, device, warmup=0, repetitions=1)
            if round_index >= warmup_rounds:
                timings[name] += timing
    return timings


@contextlib.contextmanager
def cpu_threads(device: torch.device, count: int = 1):
    """``count`` torch threads while inside, on CPU only (restored after).

    On the shared 2-core machine a second OpenMP thread mostly spins under other jobs'
    load: the same forward measured 30x slower and erratic with 2 threads (bench_mome).
    """
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def command_line(main: Callable[..., None], description: str | None = None) -> None:
    """``python -m benchmarks.bench_<suite> [--quick] [--cases SET] [--device D] [--output-root R]``.

    Calls ``main``; ``--cases`` reaches it only when given: ``target`` (the performance targets'
    shapes, what benchmarks/gpu_check.py measures on a GPU) or ``tiny`` (smallest shapes on any
    device, that script's dry run).
    """
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--cases", choices=CASE_SETS, help="target: the targets' shapes; tiny: smallest")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--output-root", help="results folder root (default: benchmarks/results)")
    arguments = parser.parse_args()
    cases = {} if arguments.cases is None else {"cases": arguments.cases}
    main(quick=arguments.quick, device=arguments.device, output_root=arguments.output_root, **cases)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory allocated during one call, above what was allocated before (MiB)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20


@dataclass
class Measurement:
    """One provider on one case. ``work`` maps a unit ("tflops", "gbps") to the
    amount of work per call (FLOPs, bytes or tokens) so rates are derived, never typed in."""

    case: dict
    provider: str
    timings_ms: list[float]
    work: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: float | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.timings_ms)

    def rates(self) -> dict[str, float]:
        seconds = self.median_ms / 1e3
        scale = {"tflops": 1e12, "gbps": 1e9, "tokens": 1.0}
        return {unit: amount / seconds / scale[unit] for unit, amount in self.work.items()}


def run_suite(suite: str, measurements: list[Measurement], device: torch.device, *,
              baseline: str | None = None, x_key: str | None = None, notes: str = "",
              output_root: str | None = None) -> str:
    """Write ``<root>/<device>/<suite>.json``, render ``.md`` and ``.png`` from it; return the JSON path.

    ``output_root`` defaults to benchmarks/results under the working directory (in a checkout,
    the committed results); quick runs pass another root so they never overwrite measured
    results.
    """
    output_dir = os.path.join(output_root or RESULTS_DIR, device_tag(device))
    os.makedirs(output_dir, exist_ok=True)
    tag = device_tag(device)
    record = {
        "suite": suite,
        "device": device_description(device),
        "device_tag": tag,
        "peaks": DEVICE_PEAKS.get(tag, {}),
        "versions": _versions(),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "baseline": baseline,
        "x_key": x_key,
        "notes": notes,
        "measurements": [
            {
                "case": m.case,
                "provider": m.provider,
                "timings_ms": m.timings_ms,
                "median_ms": m.median_ms,
                "work": m.work,
                "rates": m.rates(),
                "peak_memory_mb": m.peak_memory_mb,
            }
            for m in measurements
        ],
    }
    json_path = os.path.join(output_dir, f"{suite}.json")
    with open(json_path, "w") as handle:
        json.dump(record, handle, indent=1)
    render(json_path)
    return json_path


def _case_label(case: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in case.items())


def render(json_path: str) -> None:
    """Markdown table and PNG plot of one results JSON (re-runnable on old results)."""
    with open(json_path) as handle:
        record = json.load(handle)
    rows = record["measurements"]
    baseline = record.get("baseline")
    baseline_ms = {
        _case_label(row["case"]): row["median_ms"] for row in rows if row["provider"] == baseline
    }
    peaks = record.get("peaks", {})
    lines = [
        f"# {record['suite']}",
        "",
        f"Device: {record['device']} · commit {record['commit']} · {record['date']} · "
        + ", ".join(f"{name} {version}" for name, version in record["versions"].items()),
        "",
    ]
    if record.get("notes"):
        lines += [record["notes"], ""]
    lines += [
        "| case | provider | median ms | vs " + (baseline or "-") + " | rate | % of peak | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        label = _case_label(row["case"])
        speedup = baseline_ms.get(label)
        speedup_text = f"{speedup / row['median_ms']:.2f}x" if speedup else "-"
        rate_text, peak_text = [], []
        for unit, value in row["rates"].items():
            rate_text.append(f"{value:.1f} {RATE_LABELS[unit]}")
            peak = peaks.get(PEAK_KEYS.get(unit, ""))
            if peak:
                peak_text.append(f"{100 * value / peak:.0f}%")
        memory = row.get("peak_memory_mb")
        lines.append(
            f"| {label} | {row['provider']} | {row['median_ms']:.3f} | {speedup_text} | "
            f"{' / '.join(rate_text) or '-'} | {' / '.join(peak_text) or '-'} | "
            f"{'-' if memory is None else f'{memory:.0f}'} |"
        )
    with open(json_path[: -len(".json")] + ".md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    _plot(record, baseline_ms, json_path[: -len(".json")] + ".png")


def _plot(record: dict, baseline_ms: dict[str, float], png_path: str) -> None:
    """Speedup over the baseline per case, one line per provider."""
    from mkfast.plotting import pyplot

    plt = pyplot()
    if plt is None or not baseline_ms:
        return
    figure, axis = plt.subplots(figsize=(8, 4.5))
    providers = sorted({row["provider"] for row in record["measurements"]})
    labels = list(dict.fromkeys(_case_label(row["case"]) for row in record["measurements"]))
    for provider in providers:
        points = {
            _case_label(row["case"]): baseline_ms[_case_label(row["case"])] / row["median_ms"]
            for row in record["measurements"]
            if row["provider"] == provider and _case_label(row["case"]) in baseline_ms
        }
        xs = [index for index, label in enumerate(labels) if label in points]
        axis.plot(xs, [points[labels[index]] for index in xs], marker="o", label=provider)
    axis.set_xticks(range(len(labels)))
    axis.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
    axis.set_ylabel(f"speedup vs {record['baseline']}")
    axis.set_title(f"{record['suite']} on {record['device']}")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)
    plt.close(figure)


def compare(results_a: str, results_b: str) -> str:
    """Markdown tables of every suite present in both result folders: median ms side by side.

    ``results_a`` / ``results_b`` are folders like benchmarks/results/h100 and
    benchmarks/results/h200 (or two runs of the same device at two commits).
    """
    sections = []
    suites_a = {os.path.basename(path) for path in _json_files(results_a)}
    suites_b = {os.path.basename(path) for path in _json_files(results_b)}
    for name in sorted(suites_a & suites_b):
        with open(os.path.join(results_a, name)) as handle:
            record_a = json.load(handle)
        with open(os.path.join(results_b, name)) as handle:
            record_b = json.load(handle)
        medians_b = {(_case_label(row["case"]), row["provider"]): row["median_ms"]
                     for row in record_b["measurements"]}
        lines = [
            f"## {record_a['suite']}",
            "",
            f"A: {record_a['device']} @ {record_a['commit']} · "
            f"B: {record_b['device']} @ {record_b['commit']}",
            "",
            "| case | provider | A ms | B ms | A/B |",
            "|---|---|---:|---:|---:|",
        ]
        for row in record_a["measurements"]:
            key = (_case_label(row["case"]), row["provider"])
            if key in medians_b:
                lines.append(f"| {key[0]} | {key[1]} | {row['median_ms']:.3f} | {medians_b[key]:.3f} | "
                             f"{row['median_ms'] / medians_b[key]:.2f} |")
        sections.append("\n".join(lines))
    if not sections:
        return f"no suite has results in both {results_a} and {results_b}"
    return "\n\n".join(sections)


def _json_files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.json")))

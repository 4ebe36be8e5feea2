"""`make demo` / `mkfast demo`: the whole project on the embedded digits set, no download.

Stages (each writes under ``output_dir``):
  1. environment: versions, extension build, backend choices;
  2. RA-CM3: VQ tokenizer, CLIP, memory, generator trained with and without retrieval;
  3. MKS2: stage 1, stage 2, multiple-choice evaluation against a LoRA baseline;
  4. kernels: a quick pass of every benchmark suite on this device.
Then one summary table is printed and ``results.json`` + ``index.html`` (which
shows every plot and image grid produced) are written. A stage that fails is
reported, the others still run, and the command exits non-zero.
"""

from __future__ import annotations

import html
import json
import os
import time
import traceback
from typing import Callable

import torch


def _environment_stage(output_dir: str, quick: bool) -> dict:
    from mkfast.cli import environment_report

    report = environment_report()
    print(report, flush=True)
    with open(os.path.join(output_dir, "environment.txt"), "w") as handle:
        handle.write(report + "\n")
    return {"device": "cuda" if torch.cuda.is_available() else "cpu"}


def _racm3_stage(output_dir: str, quick: bool) -> dict:
    from mkfast.racm3.demo import run_demo

    return run_demo(output_dir, quick=quick)


def _mks2_stage(output_dir: str, quick: bool) -> dict:
    from mkfast.mks2.demo import run_demo

    return run_demo(output_dir, quick=quick)


def _kernels_stage(output_dir: str, quick: bool) -> dict:
    from mkfast.cli import benchmark_suites, run_benchmarks

    # Always the quick sizes here: the full suites are `make bench`.
    run_benchmarks([], quick=True, output_root=output_dir)
    return {"suites": benchmark_suites()}


STAGES: dict[str, Callable[[str, bool], dict]] = {
    "environment": _environment_stage,
    "racm3": _racm3_stage,
    "mks2": _mks2_stage,
    "kernels": _kernels_stage,
}


def _scalar_rows(prefix: str, value, rows: list[tuple[str, str]]) -> None:
    """Flatten nested results into (key, value) rows for the summary table."""
    if isinstance(value, dict):
        for key, item in value.items():
            _scalar_rows(f"{prefix}.{key}" if prefix else str(key), item, rows)
    elif isinstance(value, float):
        rows.append((prefix, f"{value:.4g}"))
    elif isinstance(value, (int, str, bool)) and len(str(value)) < 80:
        rows.append((prefix, str(value)))


def summary_table(results: dict) -> str:
    rows: list[tuple[str, str]] = []
    _scalar_rows("", results, rows)
    width = max((len(key) for key, _ in rows), default=10)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def _write_index(output_dir: str, results: dict) -> str:
    images = []
    for root, _, files in os.walk(output_dir):
        for name in sorted(files):
            if name.endswith(".png"):
                images.append(os.path.relpath(os.path.join(root, name), output_dir))
    figures = "\n".join(
        f'<figure><img src="{html.escape(path)}" style="max-width:640px"><figcaption>{html.escape(path)}'
        "</figcaption></figure>"
        for path in sorted(images)
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>mkfast demo</title></head><body>"
        "<h1>mkfast demo</h1><h2>Results</h2>"
        f"<pre>{html.escape(json.dumps(results, indent=1, default=str))}</pre>"
        f"<h2>Plots and images</h2>{figures}</body></html>"
    )
    path = os.path.join(output_dir, "index.html")
    with open(path, "w") as handle:
        handle.write(page)
    return path


def run_demo(output_dir: str = "demo_out", quick: bool = False, stages: list[str] | None = None) -> dict:
    """Run the demo stages; returns {"results": ..., "failed": [...], "seconds": ...}."""
    os.makedirs(output_dir, exist_ok=True)
    results: dict = {"quick": quick}
    failed: list[str] = []
    started = time.perf_counter()
    for name in stages or list(STAGES):
        stage_dir = output_dir if name in ("environment", "kernels") else os.path.join(output_dir, name)
        os.makedirs(stage_dir, exist_ok=True)
        print(f"\n== demo stage: {name}", flush=True)
        stage_started = time.perf_counter()
        try:
            results[name] = STAGES[name](stage_dir, quick)
        except Exception as error:  # a failed stage is reported; the others still run
            traceback.print_exc()
            failed.append(name)
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        results.setdefault(name, {})
        if isinstance(results[name], dict):
            results[name]["seconds"] = round(time.perf_counter() - stage_started, 1)
    results["seconds"] = round(time.perf_counter() - started, 1)
    with open(os.path.join(output_dir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1, default=str)
    index = _write_index(output_dir, results)
    print("\n== summary\n" + summary_table(results), flush=True)
    print(f"\nwrote {os.path.join(output_dir, 'results.json')} and {index}", flush=True)
    if failed:
        print(f"FAILED stages: {', '.join(failed)}", flush=True)
    return {"results": results, "failed": failed, "seconds": results["seconds"]}

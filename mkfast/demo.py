"""`make demo` / `mkfast demo`: the whole project on the embedded digits set, no download.

Stages (each writes under ``output_dir``):
  1. environment: versions, extension build, backend choices;
  2. RA-CM3: VQ tokenizer, CLIP, memory, generators trained with and without retrieval on
     digits 0-6 while the memory holds every digit (3 seeds), held-out losses;
  3. RA-CM3 inference: images and captions sampled from those generators (K=2 vs K=0 vs CM3)
     judged by an independent classifier, k-shot classification, an image grid;
  4. MKS2: stage 1, stage 2, multiple-choice evaluation against a LoRA baseline;
  5. kernels: a quick pass of every benchmark suite on this device.
Then one summary table is printed and ``results.json`` + ``index.html`` (which
shows every plot and image grid produced) are written. A stage that fails is
reported, the others still run, and the command exits non-zero.

Device: a GPU when one is present (``device="auto"``). There the models train on it
through the fused kernels (mkfast attention in the RA-CM3 generator, the top-k kernel
for retrieval, the MoME FFN op in MKS2) and the full run uses larger settings
(:func:`mkfast.racm3.demo.demo_sizes`, :func:`mkfast.mks2.demo.demo_settings`);
``--quick`` keeps its small settings on every device.
"""

from __future__ import annotations

import glob
import json
import math
import os
import time
import traceback
from collections.abc import Callable

import torch

from mkfast.progress import is_quiet, say
from mkfast.progress import quiet as quiet_progress
from mkfast.report import write_report

DEVICES = ("auto", "cpu", "cuda")


def demo_device(requested: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one. Asking for cuda without one fails here, before any stage runs."""
    if requested not in DEVICES:
        raise ValueError(f"mkfast demo: device must be one of {DEVICES}, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("mkfast demo: --device cuda was asked for, but torch sees no CUDA device")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def _environment_stage(output_dir: str, quick: bool, device: torch.device) -> dict:
    from mkfast.environment import environment_report

    report = environment_report()
    print(report, flush=True)
    with open(os.path.join(output_dir, "environment.txt"), "w") as handle:
        handle.write(report + "\n")
    return {"device": str(device)}


def _racm3_stage(output_dir: str, quick: bool, device: torch.device) -> dict:
    from mkfast.racm3.demo import run_demo

    return run_demo(output_dir, quick=quick, device=device, progress=not is_quiet())


def _racm3_inference_stage(output_dir: str, quick: bool, device: torch.device) -> dict:
    from mkfast.racm3.inference_demo import run_inference_demo

    # The generators the racm3 stage trained (its directory is this one's sibling).
    summary = run_inference_demo(os.path.join(os.path.dirname(output_dir), "racm3"), output_dir, quick=quick,
                                 device=device)
    return summary | _racm3_inference_report(summary)


def _racm3_inference_report(summary: dict) -> dict:
    """The report's figures and tables for the inference stage (see mkfast/report.py)."""
    figures = [{"path": "racm3_inference/text_to_image_grid.png",
                "caption": "Text to image, first seed, K=2 on memory-only digits: each row a prompt, its "
                           "retrieved documents, then the samples (CLIP-reranked)"}]
    configurations = [name for name in summary if isinstance(summary.get(name), dict)
                      and "memory_only" in summary[name]]
    judged = {"title": "Memory-only digits, judged by the independent classifier (mean over seeds)",
              "columns": ["configuration", "text to image: best sample's class right",
                          "captioning: class right"],
              "rows": [[name, summary[name]["memory_only"]["text_to_image"].get("judge_accuracy_best", ""),
                        summary[name]["memory_only"]["image_to_text"].get("class_accuracy", "")]
                       for name in configurations]}
    k_shot = summary.get("k_shot", {}).get("ensemble_accuracy", {})
    curve = {"title": "k-shot classification between two memory-only digits (ensemble, chance 0.5)",
             "columns": ["k", "accuracy (mean over seeds)"],
             "rows": [[k, value] for k, value in k_shot.items()]}
    first = (summary.get("per_seed") or [{}])[0]
    examples = first.get("racm3_k2", {}).get("memory_only", {}).get("image_to_text", {}).get("examples", [])
    captions = {"title": "Captions of memory-only digits, first seed, K=2 (the image's true caption first)",
                "columns": ["true caption", "generated caption"], "rows": examples}
    return {"figures": figures, "tables": [table for table in (judged, curve, captions) if table["rows"]]}


def _mks2_stage(output_dir: str, quick: bool, device: torch.device) -> dict:
    from mkfast.mks2.demo import run_demo

    summary = run_demo(output_dir, quick=quick, device=device)
    return summary | _mks2_report(summary)


def _mks2_report(summary: dict) -> dict:
    """Per seed/split run: each arm's held-out accuracy and the probe, for the report page."""
    runs = summary.get("runs", [])
    arms = list(runs[0]["results"]) if runs else []
    rows = [[run["seed"], ", ".join(map(str, run.get("held_out_classes", []))),
             *[run["results"][arm]["held_out"]["acc"] for arm in arms],
             run.get("probe", {}).get("mks2", {}).get("held_out_acc", "")] for run in runs]
    table = {"title": "Held-out colour questions per run (chance 0.5)",
             "columns": ["seed", "held-out digits", *arms, "probe (MKS2 arm)"], "rows": rows}
    return {"figures": [{"path": "mks2/loss.png", "caption": "Training loss per stage and arm, first run"}],
            "tables": [table] if rows else []}


def _kernels_stage(output_dir: str, quick: bool, device: torch.device) -> dict:
    from mkfast.bench import run_benchmarks

    # Always the quick sizes here: the full suites are `make bench`.
    root = os.path.join(output_dir, "benchmarks")
    run_benchmarks([], quick=True, output_root=root)
    return {"speedups": benchmark_speedups(root)}


def benchmark_speedups(results_root: str) -> dict[str, dict[str, float]]:
    """Per suite and provider: the geometric mean over cases of the baseline's time over the provider's."""
    speedups: dict[str, dict[str, float]] = {}
    for path in sorted(glob.glob(os.path.join(results_root, "*", "*.json"))):
        with open(path) as handle:
            record = json.load(handle)
        if "measurements" not in record:
            continue  # not a benchmark suite's file
        baseline = record.get("baseline")
        by_case: dict[str, dict[str, float]] = {}
        for row in record["measurements"]:
            case = json.dumps(row["case"], sort_keys=True)
            by_case.setdefault(case, {})[row["provider"]] = row["median_ms"]
        ratios: dict[str, list[float]] = {}
        for providers in by_case.values():
            if baseline in providers:
                for provider, milliseconds in providers.items():
                    if provider != baseline:
                        ratios.setdefault(provider, []).append(providers[baseline] / milliseconds)
        speedups[f"{record['suite']} vs {baseline}"] = {
            provider: math.exp(sum(map(math.log, values)) / len(values))
            for provider, values in ratios.items()
        }
    return speedups


STAGES: dict[str, Callable[[str, bool, torch.device], dict]] = {
    "environment": _environment_stage,
    "racm3": _racm3_stage,
    "racm3_inference": _racm3_inference_stage,
    "mks2": _mks2_stage,
    "kernels": _kernels_stage,
}


# The rows the printed summary shows (every number is in results.json and index.html):
# (label, path into the results, with "*" standing for every key at that level).
HEADLINE = [
    # RA-CM3 rows: means over seeds on the memory-only digits 7-9 (the claims table pairs the seeds).
    ("RA-CM3 held-out image-token loss, K~U{0,1,2} training, K=2",
     "racm3.runs.retrieval.held_out_image_token_loss"),
    ("RA-CM3 held-out image-token loss, no retrieval", "racm3.runs.no_retrieval.held_out_image_token_loss"),
    ("RA-CM3 held-out caption-token loss, K~U{0,1,2} training, K=2",
     "racm3.runs.retrieval.held_out_caption_token_loss"),
    ("RA-CM3 held-out caption-token loss, no retrieval",
     "racm3.runs.no_retrieval.held_out_caption_token_loss"),
    ("RA-CM3 mechanism check, entities only in memory, image-token loss, *", "racm3.entities.means.*.image"),
    ("text-to-image judged accuracy (best of N), *",
     "racm3_inference.*.memory_only.text_to_image.judge_accuracy_best"),
    ("captioning judged class accuracy, *", "racm3_inference.*.memory_only.image_to_text.class_accuracy"),
    ("k-shot accuracy (ensemble), k=*", "racm3_inference.k_shot.ensemble_accuracy.*"),
    ("MKS2 held-out text questions acc, *", "mks2.results.*.held_out_text_questions.acc"),
    ("MKS2 probe: held-out colour read from text (chance 0.5), *", "mks2.probe.*.mean"),
    ("MKS2 mechanism check, held-out entities' colour acc, *", "mks2.entities.held_out_acc.*"),
    ("MKS2 note", "mks2.note"),
    ("benchmark speedup over the baseline (geomean), *", "kernels.speedups.*.*"),
    ("seconds, *", "*.seconds"),
]


def _lookup(value, keys: list[str], matched: list[str], rows: list[tuple[str, str]], label: str) -> None:
    if not keys:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        rows.append((label.replace("*", " · ".join(matched)) if matched else label, text))
        return
    if not isinstance(value, dict):
        return
    head, rest = keys[0], keys[1:]
    for key in (list(value) if head == "*" else [head]):
        if key in value:
            _lookup(value[key], rest, matched + [str(key)] if head == "*" else matched, rows, label)


def summary_rows(results: dict) -> list[tuple[str, str]]:
    """The HEADLINE rows found in ``results``: (label, value) pairs."""
    rows: list[tuple[str, str]] = []
    for label, path in HEADLINE:
        _lookup(results, path.split("."), [], rows, label)
    return rows


def claims_table(claims: list[dict]) -> str:
    """One aligned line per claim: paper, claim, arms, gain, interval, verdict."""
    keys = ("paper", "claim", "arms", "measured", "interval", "verdict")
    widths = [max(len(str(claim.get(key, ""))) for claim in claims) for key in keys]
    return "\n".join("  ".join(f"{str(claim.get(key, '')):<{width}}"
                               for key, width in zip(keys, widths, strict=True))
                     for claim in claims)


def summary_table(results: dict) -> str:
    """The HEADLINE rows found in ``results``, as an aligned two-column table."""
    rows = summary_rows(results)
    width = max((len(key) for key, _ in rows), default=10)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def run_demo(output_dir: str = "demo_out", quick: bool = False, stages: list[str] | None = None,
             device: str = "auto", quiet: bool = False) -> dict:
    """Run the demo stages; returns {"results": ..., "failed": [...], "seconds": ...}.

    Each stage prints a line when it starts and when it ends (with its time) and shows progress
    of its long loops; ``quiet`` silences both, leaving the summary.
    """
    with quiet_progress(quiet):
        return _run_stages(output_dir, quick, stages, device)


def _run_stages(output_dir: str, quick: bool, stages: list[str] | None, device: str) -> dict:
    resolved = demo_device(device)
    os.makedirs(output_dir, exist_ok=True)
    results: dict = {"quick": quick, "device": str(resolved)}
    failed: list[str] = []
    started = time.perf_counter()
    names = stages or list(STAGES)
    for number, name in enumerate(names, start=1):
        stage_dir = output_dir if name in ("environment", "kernels") else os.path.join(output_dir, name)
        os.makedirs(stage_dir, exist_ok=True)
        say(f"\n== demo stage {number}/{len(names)}: {name}")
        stage_started = time.perf_counter()
        try:
            results[name] = STAGES[name](stage_dir, quick, resolved)
        except Exception as error:  # a failed stage is reported; the others still run
            traceback.print_exc()
            failed.append(name)
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        results.setdefault(name, {})
        if isinstance(results[name], dict):
            results[name]["seconds"] = round(time.perf_counter() - stage_started, 1)
        outcome = "FAILED" if name in failed else "done"
        elapsed = time.perf_counter() - stage_started
        say(f"== demo stage {number}/{len(names)}: {name} {outcome} in {elapsed:.0f} s")
    results["seconds"] = round(time.perf_counter() - started, 1)
    # Each stage reports its papers' claims (mkfast.claims rows); the headline shows them first.
    claims = [claim for name in names if isinstance(results.get(name), dict)
              for claim in results[name].get("claims", [])]
    if claims:
        results["claims"] = claims
    with open(os.path.join(output_dir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1, default=str)
    index = write_report(output_dir, results, summary_rows(results))
    if claims:
        print("\n== the papers' claims\n" + claims_table(claims), flush=True)
    print("\n== summary\n" + summary_table(results), flush=True)
    print(f"\nwrote {os.path.join(output_dir, 'results.json')} and {index}", flush=True)
    if failed:
        print(f"FAILED stages: {', '.join(failed)}", flush=True)
    return {"results": results, "failed": failed, "seconds": results["seconds"]}

"""What benchmarks/gpu_check.py brings back: the run's JSON and Markdown, the files in OUT, unpacking.

OUT holds at most 8 flat files, each under 16 MiB (what a device call returns):
gpu_check.json (machine, clocks, versions, commit, every step with its output tail, the tests'
JUnit summary, every suite's record as benchmarks.common.run_suite writes it, every repetition
included), gpu_check.md (the same as tables), tests.xml, and each suite's PNG while files are left.
``unpack`` turns such a folder into benchmarks/results/<device>/, the committed form.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

MAX_OUT_FILES, MAX_FILE_BYTES = 8, 16 * 2**20
REPORT_FILES = ("gpu_check.json", "gpu_check.md")

VERSION_PROBE = r"""
import importlib.metadata, json, platform
info = {"python": platform.python_version()}
for name in ("torch", "triton", "numpy", "transformers", "faiss-cpu", "open_clip_torch",
             "vector-quantize-pytorch", "pytest"):
    try:
        info[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
import torch
info["torch_cuda"] = torch.version.cuda
if torch.cuda.is_available():
    properties = torch.cuda.get_device_properties(0)
    info["gpu"] = {"name": properties.name, "capability": list(torch.cuda.get_device_capability(0)),
                   "multiprocessors": properties.multi_processor_count,
                   "memory_gib": round(properties.total_memory / 2**30, 1)}
try:
    from mkfast import _extension
    info["mkfast_extension"] = _extension.missing_reason() or _extension.built_parts()
except Exception as error:
    info["mkfast_extension"] = f"mkfast does not import: {error}"
print(json.dumps(info))
"""


def versions(python: str, env: dict[str, str], root: str, wheels: list[str]) -> dict:
    """Versions of what the steps ran on (``python`` with ``env``), nvcc's, the carried wheels."""
    result = subprocess.run([python, "-c", VERSION_PROBE], cwd=root, env=env, capture_output=True, text=True,
                            timeout=120)
    if result.returncode != 0:
        return {"error": result.stderr.strip()[-2000:]}
    found = json.loads(result.stdout.strip().splitlines()[-1])
    nvcc = shutil.which("nvcc")
    if nvcc:
        output = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
        found["nvcc"] = output.strip().splitlines()[-1]
    found["carried_wheels"] = [os.path.basename(path) for path in wheels]
    return found


def nvidia_smi() -> dict | str:
    """The GPU's name, driver and clocks as nvidia-smi reads them now, or why not."""
    fields = ["name", "driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
              "power.draw", "power.limit", "temperature.gpu", "memory.total"]
    try:
        output = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return f"not readable: {error}"
    return dict(zip(fields, (value.strip() for value in output.splitlines()[0].split(",")), strict=False))


def junit_summary(path: str) -> dict:
    """Counts and every test case (name, outcome, seconds, message) of a JUnit XML file."""
    if not os.path.exists(path):
        return {"error": "no JUnit XML was written"}
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(suite.get(key, 0)) for suite in suites)
              for key in ("tests", "failures", "errors", "skipped")}
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = child.tag, (child.get("message") or "")[:300]
        cases.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0)), "message": message})
    counts["passed"] = sum(case["outcome"] == "passed" for case in cases)
    return {**counts, "cases": cases}


def suite_records(results_dir: str, commit: str) -> dict[str, dict]:
    """Every suite record (run_suite's JSON) under ``results_dir``/<device>/, by suite name."""
    records = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "*.json"))):
        with open(path) as handle:
            record = json.load(handle)
        if record.get("commit") in (None, "unknown"):
            record["commit"] = commit  # a copied checkout without .git: the commit the run was given
        records[record["suite"]] = record
    return records


def audit_record(json_path: str, markdown_path: str) -> dict | None:
    """`mkfast audit`'s JSON and Markdown, kept inside the run's record (OUT has no room for two files)."""
    if not os.path.exists(json_path):
        return None
    with open(json_path) as handle:
        record = json.load(handle)
    markdown_text = ""
    if os.path.exists(markdown_path):
        with open(markdown_path) as handle:
            markdown_text = handle.read()
    return {"record": record, "markdown": markdown_text}


def _cell(value) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def markdown(report: dict, results_dir: str) -> str:
    environment = report["environment"]
    lines = [f"# GPU check{' (dry run: CPU, interpreter, tiny shapes)' if report['dry_run'] else ''}", "",
             f"Commit {report['commit']} · {report['date']} · {report['wall_s']:.0f} s of a "
             f"{report['budget_s']:.0f} s budget · {environment['cores']} CPU cores", "",
             "| | |", "|---|---|",
             f"| nvidia-smi before | {_cell(environment['nvidia_smi_before'])} |",
             f"| nvidia-smi after | {_cell(environment['nvidia_smi_after'])} |"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in environment["versions"].items()]
    lines += ["", "## Steps", "", "| step | status | seconds | time box | estimate | note |",
              "|---|---|---:|---:|---:|---|"]
    for step in report["steps"]:
        lines.append(f"| {step['name']} | {step['status']} | {step['seconds']:.1f} | "
                     f"{step['limit_s'] or '-'} | {step['estimate_s'] or '-'} | {step['note']} |")
    tests = report["tests"]
    lines += ["", "## Tests (tests.xml)", ""]
    if "error" in tests:
        lines.append(tests["error"])
    else:
        keys = ("tests", "passed", "failures", "errors", "skipped")
        lines.append(", ".join(f"{tests[key]} {key}" for key in keys))
        lines += [f"- {case['outcome']}: {case['name']}: {case['message']}" for case in tests["cases"]
                  if case["outcome"] in ("failure", "error")]
    for name, record in report["suites"].items():
        rendered = os.path.join(results_dir, record["device_tag"], f"{name}.md")
        if os.path.exists(rendered):
            with open(rendered) as handle:
                lines += ["", "#" + handle.read().strip()]  # the suite's own table, one heading level down
    if report.get("audit"):
        lines += ["", "#" + report["audit"]["markdown"].strip()]  # its own heading, one level down
    for step in report["steps"]:
        if step["status"] in ("failed", "timed out"):
            lines += ["", f"## {step['name']}: output ({step['status']})", "", "```",
                      step["output_tail"].strip(), "```"]
    return "\n".join(lines) + "\n"


def write_outputs(out: str, report: dict, junit: str, results_dir: str) -> list[str]:
    """gpu_check.json, gpu_check.md, tests.xml and the suites' PNGs into ``out``, within the limits."""
    os.makedirs(out, exist_ok=True)
    written, left_out = [], []
    pngs = [os.path.join(results_dir, record["device_tag"], f"{name}.png")
            for name, record in report["suites"].items()]
    for path in [junit, *pngs]:  # the JUnit XML first: it stays whatever else has to go
        name = os.path.basename(path)
        if not os.path.exists(path):
            continue
        if len(written) >= MAX_OUT_FILES - len(REPORT_FILES):
            left_out.append(f"{name} (more than {MAX_OUT_FILES} files)")
        elif os.path.getsize(path) >= MAX_FILE_BYTES:
            left_out.append(f"{name} (16 MiB or more)")
        else:
            shutil.copyfile(path, os.path.join(out, name))
            written.append(name)
    report["files"] = sorted([*REPORT_FILES, *written])
    report["left_out"] = left_out
    with open(os.path.join(out, "gpu_check.md"), "w") as handle:
        handle.write(markdown(report, results_dir))
    with open(os.path.join(out, "gpu_check.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    return report["files"]


def unpack(folder: str, results_root: str) -> int:
    """``folder``'s suites -> <results_root>/<device>/<suite>.json, .md and .png (rendered again here),
    with the run's gpu_check.json, gpu_check.md and tests.xml beside them."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.common import render

    with open(os.path.join(folder, "gpu_check.json")) as handle:
        report = json.load(handle)
    if report["dry_run"]:
        print("gpu_check: a dry run's numbers are not results; nothing unpacked", file=sys.stderr)
        return 1
    for name, record in report["suites"].items():
        target = os.path.join(results_root, record["device_tag"])
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, f"{name}.json"), "w") as handle:
            json.dump(record, handle, indent=1)
        render(os.path.join(target, f"{name}.json"))
        print(f"{target}/{name}.json, .md, .png")
    for tag in {record["device_tag"] for record in report["suites"].values()}:
        for name in (*REPORT_FILES, "tests.xml"):
            if os.path.exists(os.path.join(folder, name)):
                shutil.copyfile(os.path.join(folder, name), os.path.join(results_root, tag, name))
    return 0

"""benchmarks/gpu_check.py, the one command of a borrowed GPU machine, kept from rotting unseen: its
budget, its isolation of steps, the wheel list, and its CPU dry run end to end."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import gpu_check, gpu_report  # noqa: E402

STEP_NAMES = ["wheels", "build", "tests", "attention", "mome", "topk_dedup", "e2e", "audit"]
SUITES = {"attention", "mome", "topk_dedup", "e2e_racm3", "e2e_mks2"}


def test_budget_drops_the_slowest_suites_first_and_never_the_build_or_tests():
    steps = [gpu_check.Step("build", 100, 1000), gpu_check.Step("tests", 100, 1000),
             gpu_check.Step("a", 50, 1000, suite=True), gpu_check.Step("b", 80, 1000, suite=True),
             gpu_check.Step("c", 30, 1000, suite=True)]
    total = gpu_check.RESERVE_S + 360
    assert gpu_check.plan(steps, total) == {}
    assert set(gpu_check.plan(steps, total - 1)) == {"b"}
    assert set(gpu_check.plan(steps, total - 81)) == {"a", "b"}
    assert set(gpu_check.plan(steps, 10)) == {"a", "b", "c"}


def test_every_step_fits_the_default_budget_by_its_estimate():
    assert [step.name for step in gpu_check.STEPS] == STEP_NAMES
    assert gpu_check.plan(gpu_check.STEPS, gpu_check.DEFAULT_BUDGET_S) == {}
    assert gpu_check.DEFAULT_BUDGET_S <= 9 * 60


def _run(tmp_path, budget=100.0):
    arguments = argparse.Namespace(dry_run=True, out=str(tmp_path / "out"), work_dir=str(tmp_path / "work"),
                                   budget=budget, no_build=True, commit="test")
    return gpu_check.Run(arguments)


def test_a_failing_or_hanging_step_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 0.5)
    run = _run(tmp_path)
    failed = run.execute(gpu_check.Step("fails", 1, 30), [sys.executable, "-c", "print('boom'); exit(3)"])
    hung = run.execute(gpu_check.Step("hangs", 1, 1.0), [sys.executable, "-c", "import time; time.sleep(60)"])
    passed = run.execute(gpu_check.Step("passes", 1, 30), [sys.executable, "-c", "print('fine')"])
    assert (failed.status, failed.returncode) == ("failed", 3) and "boom" in failed.output_tail
    assert hung.status == "timed out"
    assert passed.status == "passed" and "fine" in passed.output_tail
    run.deadline = time.monotonic()  # the budget spent: the next step is dropped, not started
    dropped = run.execute(gpu_check.Step("late", 1, 30), [sys.executable, "-c", "raise SystemExit(1)"])
    assert dropped.status == "dropped" and dropped.returncode is None
    assert [step.name for step in run.steps] == ["fails", "hangs", "passes", "late"]


def test_the_wheel_list_pins_each_package_once():
    names = []
    with open(os.path.join(ROOT, "benchmarks", "gpu_wheels.txt")) as handle:
        for line in handle:
            requirement = line.split("#")[0].strip()
            if requirement:
                name, _, version = requirement.partition("==")
                assert version, f"{requirement!r} is not pinned"
                names.append(name.lower().replace("_", "-"))
    assert len(names) == len(set(names)) and "faiss-cpu" in names


def test_two_versions_of_one_wheel_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "WHEELS_DIR", str(tmp_path))
    (tmp_path / "einx-0.4.3-py3-none-any.whl").write_bytes(b"0")
    assert gpu_check.wheels_report() == 0
    (tmp_path / "einx-0.4.2-py3-none-any.whl").write_bytes(b"0")
    assert gpu_check.wheels_report() == 1
    assert "two versions of ['einx']" in capsys.readouterr().err


def test_the_audit_lands_in_the_runs_record_and_its_markdown(tmp_path):
    record = {"kernels": [{"name": "_attn_fwd_kernel", "registers": 168}]}
    (tmp_path / "audit.json").write_text(json.dumps(record))
    (tmp_path / "audit.md").write_text("# sm_90a static audit\n\n| kernel | registers |\n")
    audit = gpu_report.audit_record(str(tmp_path / "audit.json"), str(tmp_path / "audit.md"))
    assert audit["record"]["kernels"][0]["registers"] == 168
    environment = {"cores": 16, "nvidia_smi_before": "not readable", "nvidia_smi_after": "not readable",
                   "versions": {"torch": "2.11.0"}}
    report = {"dry_run": False, "commit": "abc", "date": "2026-11-30", "wall_s": 1.0, "budget_s": 540.0,
              "environment": environment, "steps": [], "tests": {"error": "no JUnit XML was written"},
              "suites": {}, "audit": audit}
    text = gpu_report.markdown(report, str(tmp_path))
    assert "## sm_90a static audit" in text and "| kernel | registers |" in text
    assert gpu_report.audit_record(str(tmp_path / "missing.json"), str(tmp_path / "audit.md")) is None


@pytest.mark.slow
def test_dry_run_brings_back_what_a_gpu_run_would(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--out", str(out),
               "--dry-run", "--no-build", "--work-dir", str(work), "--commit", "test", "--budget", "1200"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    files = sorted(os.listdir(out))
    assert len(files) <= gpu_report.MAX_OUT_FILES
    assert all(os.path.isfile(out / name) and os.path.getsize(out / name) < gpu_report.MAX_FILE_BYTES
               for name in files)
    assert {"gpu_check.json", "gpu_check.md", "tests.xml"} <= set(files)
    if any(name.endswith(".png") for name in files):  # matplotlib installed: every suite plotted
        assert {name[:-4] for name in files if name.endswith(".png")} == SUITES
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and report["commit"] == "test"
    assert [step["name"] for step in report["steps"]] == STEP_NAMES
    statuses = {step["name"]: step["status"] for step in report["steps"]}
    assert all(statuses[name] == "passed" for name in ("tests", "attention", "mome", "topk_dedup", "e2e"))
    assert report["tests"]["tests"] > 0 and report["tests"]["failures"] == report["tests"]["errors"] == 0
    assert set(report["suites"]) == SUITES
    for record in report["suites"].values():
        assert record["device_tag"] == "cpu" and record["measurements"]
        for row in record["measurements"]:  # every repetition kept, the median derived from them
            assert len(row["timings_ms"]) >= 2 and row["median_ms"] == statistics.median(row["timings_ms"])
    text = (out / "gpu_check.md").read_text()
    assert "## Steps" in text and all(f"## {suite}" in text for suite in SUITES)
    assert gpu_report.unpack(str(out), str(tmp_path / "results")) == 1  # a dry run is never committed
    assert not (tmp_path / "results").exists()
    # The same record as a GPU run's: unpacked into results/<device>/, each suite rendered again.
    report["dry_run"] = False
    for record in report["suites"].values():
        record["device_tag"] = "h200"
    (out / "gpu_check.json").write_text(json.dumps(report))
    assert gpu_report.unpack(str(out), str(tmp_path / "results")) == 0
    unpacked = set(os.listdir(tmp_path / "results" / "h200"))
    assert {f"{suite}.{kind}" for suite in SUITES for kind in ("json", "md")} <= unpacked
    assert {"gpu_check.json", "gpu_check.md", "tests.xml"} <= unpacked

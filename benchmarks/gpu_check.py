"""`make gpu-check`: one offline, time-boxed command that turns a borrowed H100/H200 into results.

    python3 benchmarks/gpu_check.py --out DIR [--budget SECONDS] [--dry-run] [--no-build]
    python3 benchmarks/gpu_check.py --wheels        # .whl/: one version each, total size
    python3 benchmarks/gpu_check.py --unpack DIR    # DIR's suites -> benchmarks/results/<device>/

Runs from a plain checkout with the machine's own python3 (stdlib only here; torch and the
rest are imported by the steps), in this order, each step a subprocess with its own time box,
so a failure or a timeout is recorded and the next step still runs:

  wheels      .whl/ (made by `make gpu-wheels`) installed with --no-index --no-deps into a
              target folder that every later step has on PYTHONPATH
  build       mkfast, editable, --no-build-isolation --no-deps, MAX_JOBS = cores, into a small
              environment layered over the interpreter's packages (nothing installed into the
              interpreter itself); MKFAST_BUILD_CUDA=1, so a toolkit that cannot build the CUDA
              kernels fails this step loudly (then a CPU-only build keeps the Triton steps alive)
  tests       every cuda-marked test (the kernels', and the models' that run on them), JUnit XML
  attention, mome, topk_dedup   each kernel benchmark at the performance targets' shapes
  e2e         the end-to-end training steps
  audit       `mkfast audit` (sm_90a machine code of these kernels), where that command exists

OUT receives at most 8 files, flat (benchmarks/gpu_report.py): gpu_check.json (machine, clocks,
versions, commit, every step with its output tail, every suite's record with every repetition),
gpu_check.md (the same as tables), tests.xml, and one PNG per suite.

--dry-run runs the same steps on the CPU (Triton's interpreter, tiny shapes, no wheels
needed, the extension built without CUDA) so the test suite can run it. --budget drops the
slowest suites first when their estimates do not fit, and clips every time box to what is left.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run as a script from a plain checkout: benchmarks/ becomes importable; nothing here needs torch.
sys.path.insert(0, ROOT)

from benchmarks import gpu_report  # noqa: E402

WHEELS_DIR = os.path.join(ROOT, ".whl")
# What may travel with a device call is 64 MiB, the checkout included: the wheels stay well under.
WHEELS_LIMIT_BYTES = 48 * 2**20
OUTPUT_TAIL_CHARS = 6000
RESERVE_S = 20.0  # kept back from the budget for the version probe and writing the results
MIN_STEP_S = 15.0  # a step given less than this is dropped rather than started
# All of tests/: the cuda-marked model tests (HF attention, RA-CM3 training, tokenizer, sampling) run
# on the kernels too, and a module that fails to import costs only its own tests
# (--continue-on-collection-errors), not the run.
TEST_PATHS = ["tests"]


@dataclass
class Step:
    """One isolated piece of the run. ``estimate_s``: wall seconds on a 16-core H100/H200 with a cold
    Triton cache, an ESTIMATE (nothing here was timed on such a machine yet); each run records the
    measured seconds of every step next to it. ``suite``: a benchmark suite, which --budget may drop."""

    name: str
    estimate_s: float
    limit_s: float
    suite: bool = False


# build: here, the same command with MKFAST_BUILD_CUDA=1 took 94 s of CPU time in all (2 C++ files and
# the CUDA file for sm_80 + sm_90a; 2 shared cores, 325 s wall), so 16 cores should take about 90 s.
STEPS = [
    Step("wheels", 10, 120),
    Step("build", 90, 360),
    Step("tests", 110, 240),
    # The limit leaves room for FlexAttention's compiles (forward and forward+backward, causal and
    # documents) on top of the estimate, which counts our kernels' compiles and timings only.
    Step("attention", 60, 240, suite=True),
    Step("mome", 70, 180, suite=True),
    Step("topk_dedup", 60, 180, suite=True),
    Step("e2e", 90, 240, suite=True),
    Step("audit", 30, 150, suite=True),
]
DEFAULT_BUDGET_S = 540.0  # 9 minutes: a device command may run 10


@dataclass
class StepResult:
    name: str
    status: str  # passed, failed, timed out, skipped, dropped
    seconds: float = 0.0
    limit_s: float | None = None
    estimate_s: float | None = None
    returncode: int | None = None
    command: list[str] = field(default_factory=list)
    note: str = ""
    output_tail: str = ""


def plan(steps: list[Step], budget_s: float) -> dict[str, str]:
    """name -> why it is dropped, for the slowest suites whose estimates do not fit in the budget."""
    dropped: dict[str, str] = {}
    total = RESERVE_S + sum(step.estimate_s for step in steps)
    for step in sorted((step for step in steps if step.suite), key=lambda step: -step.estimate_s):
        if total <= budget_s:
            break
        dropped[step.name] = f"dropped: estimates {total:.0f} s > budget {budget_s:.0f} s (slowest first)"
        total -= step.estimate_s
    return dropped


def run_command(command: list[str], *, limit_s: float, env: dict[str, str], log_path: str,
                cwd: str = ROOT) -> tuple[str, int | None, float]:
    """(status, returncode, seconds) of one subprocess; its output goes to ``log_path``.

    At the time box the process group gets SIGINT first (pytest still writes its JUnit XML then),
    then SIGKILL 15 s later.
    """
    began = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            returncode = process.wait(timeout=max(limit_s, 1.0))
            status = "passed" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
            returncode, status = process.returncode, "timed out"
    return status, returncode, time.monotonic() - began


def _signal_group(process: subprocess.Popen, which: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, which)


def _tail(path: str, chars: int = OUTPUT_TAIL_CHARS) -> str:
    with open(path, errors="replace") as handle:
        text = handle.read()
    return text if len(text) <= chars else "[...]\n" + text[-chars:]


class Run:
    """The state of one gpu-check run: paths, the environment the steps see, their results."""

    def __init__(self, arguments: argparse.Namespace):
        self.dry_run = arguments.dry_run
        self.out = os.path.abspath(arguments.out)
        self.work = os.path.abspath(arguments.work_dir)
        self.budget_s = arguments.budget
        self.build = not arguments.no_build
        self.commit = arguments.commit or _git(["describe", "--always", "--dirty"]) or "unknown"
        self.cores = os.cpu_count() or 1
        self.python = sys.executable  # the steps' interpreter; the layered environment's once built
        self.site = os.path.join(self.work, "site")
        self.results = os.path.join(self.work, "results")
        self.logs = os.path.join(self.work, "logs")
        self.junit = os.path.join(self.work, "tests.xml")
        self.audit = {kind: os.path.join(self.work, f"audit.{kind}") for kind in ("json", "md")}
        self.began = time.monotonic()
        self.deadline = self.began + self.budget_s - RESERVE_S
        self.steps: list[StepResult] = []
        for folder in (self.results, self.logs):
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
        for stale in (self.junit, *self.audit.values()):
            if os.path.exists(stale):
                os.remove(stale)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "MAX_JOBS": str(self.cores),
                    "MKFAST_BUILD_CUDA": "0" if self.dry_run else "1"}
        if self.dry_run:
            # The CPU and the interpreter even where a GPU is present: a dry run is the same on any machine.
            self.env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def execute(self, step: Step, command: list[str] | None, *, dropped: str | None = None,
                skipped: str | None = None, note: str = "") -> StepResult:
        """Run ``command`` as ``step`` within its time box and the budget left; record the result."""
        # Recorded relative to the checkout: the report is committed, the machine's paths are not.
        shown = [argument.replace(ROOT + os.sep, "") for argument in command or []]
        result = StepResult(step.name, "skipped", estimate_s=step.estimate_s, command=shown, note=note)
        limit = min(step.limit_s, self.left_s())
        if dropped or skipped:
            result.status, result.note = ("dropped", dropped) if dropped else ("skipped", skipped)
        elif limit < MIN_STEP_S:
            result.status = "dropped"
            result.note = f"dropped: {max(self.left_s(), 0):.0f} s of the budget left"
        else:
            log_path = os.path.join(self.logs, f"{step.name}.log")
            print(f"== {step.name} (time box {limit:.0f} s): {' '.join(shown)}", flush=True)
            outcome = run_command(command, limit_s=limit, env=self.env, log_path=log_path)
            result.status, result.returncode, result.seconds = outcome
            result.limit_s = round(limit, 1)
            result.output_tail = _tail(log_path)
        print(f"== {step.name}: {result.status} in {result.seconds:.1f} s {result.note}".rstrip(), flush=True)
        if result.status in ("failed", "timed out"):
            print("\n".join(result.output_tail.splitlines()[-25:]), flush=True)
        self.steps.append(result)
        return result


def _git(arguments: list[str]) -> str | None:
    try:
        return subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def wheel_files() -> list[str]:
    return sorted(glob.glob(os.path.join(WHEELS_DIR, "*.whl")))


def _wheel_platform_flags() -> list[str]:
    """pip's flags for installing the carried cp312 wheels into a folder here, never imported (dry run)."""
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                 "manylinux2014_x86_64"]
    return ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
            *[flag for name in platforms for flag in ("--platform", name)]]


def step_wheels(run: Run, step: Step) -> None:
    wheels = wheel_files()
    if not wheels:
        if run.dry_run:
            run.execute(step, None, skipped="no .whl/ (a dry run needs none)")
        else:
            run.execute(step, None, skipped="no .whl/: make it with `make gpu-wheels`, carry it")
        return
    shutil.rmtree(run.site, ignore_errors=True)
    command = [run.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--target", run.site, *wheels]
    if run.dry_run:
        # The cp312 wheels cannot be imported by this interpreter: installing them for the GPU
        # machine's platform still checks that the carried set is complete and consistent.
        command[4:4] = _wheel_platform_flags()
    result = run.execute(step, command)
    if result.status == "passed" and not run.dry_run:
        run.env["PYTHONPATH"] = os.pathsep.join(filter(None, [run.site, run.env.get("PYTHONPATH")]))


def layered_environment(run: Run) -> str:
    """A venv over the interpreter's own packages (a .pth naming its site folders); its python.

    mkfast is installed there, editable, so nothing is installed into the interpreter itself (on
    a CPU machine that interpreter is the development venv, whose mkfast must stay as it is).
    Plain paths in the .pth, not the interpreter's own .pth files: its editable mkfast stays out.
    """
    env_dir = os.path.join(run.work, "env")
    shutil.rmtree(env_dir, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env_dir], check=True, timeout=120)
    python = os.path.join(env_dir, "bin", "python")
    site_dirs = [path for path in sys.path if path.endswith(("site-packages", "dist-packages"))]
    own_site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                              capture_output=True, text=True, timeout=60).stdout.strip()
    with open(os.path.join(own_site, "_outer_packages.pth"), "w") as handle:
        handle.write("\n".join(site_dirs) + "\n")
    return python


def step_build(run: Run, step: Step) -> None:
    if not run.build:
        run.execute(step, None, skipped="--no-build: the steps use this interpreter's mkfast")
        return
    try:
        python, note = layered_environment(run), ""
    except (OSError, subprocess.SubprocessError) as error:
        if run.dry_run:  # here the interpreter is a development environment: never installed into
            run.execute(step, None, skipped=f"no layered environment: {error}")
            return
        python, note = sys.executable, f"no layered environment ({error}): installed into the interpreter"
    command = [python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "-e", ROOT]
    result = run.execute(step, command, note=note)
    if result.status != "passed" and not run.dry_run:
        # The CUDA kernels were required and did not build (recorded above, loudly); without them the
        # Triton kernels still run, so the later steps get a CPU-only extension rather than nothing.
        fallback = Step("build without CUDA", step.estimate_s / 2, step.limit_s)
        run.env["MKFAST_BUILD_CUDA"] = "0"
        result = run.execute(fallback, command)
    if result.status == "passed":
        run.python = python


def _has_module(run: Run, module: str) -> bool:
    probe = [run.python, "-c",
             f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"]
    return subprocess.run(probe, env=run.env, capture_output=True, timeout=60).returncode == 0


def step_tests(run: Run, step: Step) -> None:
    command = [run.python, "-m", "pytest", "-q", "-m", "cuda", "--continue-on-collection-errors",
               f"--junitxml={run.junit}", *TEST_PATHS]
    if not run.dry_run and _has_module(run, "xdist"):
        # Several workers compile the cold Triton cache's kernels in parallel (16 cores, one GPU).
        command += ["-n", str(min(8, run.cores))]
    run.execute(step, command)


def step_suite(run: Run, step: Step, dropped: str | None) -> None:
    device, cases = ("cpu", "tiny") if run.dry_run else ("cuda", "target")
    command = [run.python, "-m", f"benchmarks.bench_{step.name}", "--device", device, "--cases", cases,
               "--output-root", run.results]
    run.execute(step, command, dropped=dropped)


def step_audit(run: Run, step: Step, dropped: str | None) -> None:
    call = "import sys; from mkfast.cli import main; main(sys.argv[1:])"
    command = [run.python, "-c", call, "audit"]
    probe = subprocess.run([*command, "--help"], cwd=ROOT, env=run.env, capture_output=True, timeout=120)
    if dropped is None and probe.returncode != 0:
        run.execute(step, None, skipped="`mkfast audit` is not a command of this checkout")
        return
    # The sm_90a machine code of the Triton version measured, beside its numbers (gpu_check.json / .md).
    # A dry run only checks the command is there: the audit takes minutes of CPU on 2 cores.
    files = ["--json", run.audit["json"], "--markdown", run.audit["md"]]
    run.execute(step, [*command, "--help"] if run.dry_run else [*command, *files], dropped=dropped)


def check(arguments: argparse.Namespace) -> int:
    run = Run(arguments)
    environment = {"cores": run.cores, "machine": platform.machine(),
                   "nvidia_smi_before": gpu_report.nvidia_smi()}
    dropped = plan(STEPS, run.budget_s)
    for step in STEPS:
        if step.name == "wheels":
            step_wheels(run, step)
        elif step.name == "build":
            step_build(run, step)
        elif step.name == "tests":
            step_tests(run, step)
        elif step.name == "audit":
            step_audit(run, step, dropped.get(step.name))
        else:
            step_suite(run, step, dropped.get(step.name))
    environment["nvidia_smi_after"] = gpu_report.nvidia_smi()
    environment["versions"] = gpu_report.versions(run.python, run.env, ROOT, wheel_files())
    report = {"dry_run": run.dry_run, "commit": run.commit,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "budget_s": run.budget_s, "wall_s": round(time.monotonic() - run.began, 1),
              "environment": environment,
              "steps": [asdict(step) for step in run.steps], "tests": gpu_report.junit_summary(run.junit),
              "suites": gpu_report.suite_records(run.results, run.commit),
              "audit": gpu_report.audit_record(run.audit["json"], run.audit["md"])}
    files = gpu_report.write_outputs(run.out, report, run.junit, run.results)
    print("\n| step | status | seconds |\n|---|---|---:|")
    for step in run.steps:
        print(f"| {step.name} | {step.status} | {step.seconds:.1f} |")
    print(f"{len(files)} files in {run.out}: {', '.join(files)}")
    return 0 if all(step.status in ("passed", "skipped", "dropped") for step in run.steps) else 1


def wheels_report() -> int:
    """Each carried wheel and its size, the total; fails on two versions of one package or too many bytes."""
    wheels = wheel_files()
    names = [os.path.basename(path).split("-")[0].lower() for path in wheels]
    total = sum(os.path.getsize(path) for path in wheels)
    for path in wheels:
        print(f"{os.path.getsize(path) / 2**20:8.2f} MiB  {os.path.basename(path)}")
    limit = WHEELS_LIMIT_BYTES / 2**20
    print(f"{total / 2**20:8.2f} MiB  total in {len(wheels)} wheels (limit {limit:.0f} MiB)")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        print(f"gpu_check: .whl/ holds two versions of {twice}: pip refuses the set", file=sys.stderr)
    if not wheels or total > WHEELS_LIMIT_BYTES:
        print(f"gpu_check: .whl/ must hold the wheels, {limit:.0f} MiB at most", file=sys.stderr)
    return 1 if twice or not wheels or total > WHEELS_LIMIT_BYTES else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for the results (at most 8 files)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="wall seconds, the whole run")
    parser.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny shapes, no wheels")
    parser.add_argument("--no-build", action="store_true", help="use this interpreter's mkfast")
    parser.add_argument("--commit", help="commit to record where the checkout has no .git")
    parser.add_argument("--work-dir", default=os.path.join(ROOT, ".gpu-check"), help="scratch folder")
    parser.add_argument("--wheels", action="store_true", help="list .whl/ and check it")
    parser.add_argument("--unpack", metavar="OUT", help="copy a run's suites into the results folders")
    parser.add_argument("--results-root", default=os.path.join(ROOT, "benchmarks", "results"))
    arguments = parser.parse_args(argv)
    if arguments.wheels:
        return wheels_report()
    if arguments.unpack:
        return gpu_report.unpack(arguments.unpack, arguments.results_root)
    if not arguments.out:
        parser.error("--out is required (or --wheels / --unpack)")
    return check(arguments)


if __name__ == "__main__":
    sys.exit(main())

"""The `mkfast` command: `mkfast env`, `mkfast bench`, and the model pipelines' commands."""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import sys

import torch

from mkfast.demo import DEVICES as DEMO_DEVICES
from mkfast.demo import STAGES as DEMO_STAGES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def environment_report() -> str:
    """Versions, what the extension was built with, and what `auto` picks per op and device."""
    import mkfast
    from mkfast import _extension
    from mkfast.backend import dispatchers, requested_backend, triton_interpreter_enabled

    lines = [f"mkfast {mkfast.__version__}", f"torch {torch.__version__} (CUDA build: {torch.version.cuda})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}" + (" (interpreter on)" if triton_interpreter_enabled() else ""))
    except ImportError:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
    else:
        lines.append("GPU: none")
    parts = _extension.built_parts()
    missing = _extension.missing_reason()
    lines.append(
        "extension mkfast._C: " + (missing or f"CPU kernels {'yes' if parts['cpu'] else 'no'}, "
                                  f"CUDA kernels {'yes' if parts['cuda'] else 'no'}")
    )
    lines.append(f"requested backend: {requested_backend()}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    lines.append("auto picks:")
    for name, dispatcher in sorted(dispatchers().items()):
        if name.endswith("_for_tests"):
            continue
        picks = ", ".join(f"{device.type}: {dispatcher.auto_choice(device)}" for device in devices)
        lines.append(f"  {name:<20} {picks}   (has: {', '.join(sorted(dispatcher.backends))})")
    return "\n".join(lines)


def benchmark_suites() -> list[str]:
    """Names of benchmarks/bench_<name>.py files, each with a main(quick=...)."""
    paths = glob.glob(os.path.join(REPO_ROOT, "benchmarks", "bench_*.py"))
    return sorted(os.path.basename(path)[len("bench_"):-len(".py")] for path in paths)


QUICK_RESULTS_ROOT = os.path.join("demo_out", "benchmarks")


def run_benchmarks(suites: list[str], quick: bool, output_root: str | None = None) -> None:
    """Run benchmark suites; quick runs write under demo_out/ so committed results stay measured ones."""
    if not os.path.isdir(os.path.join(REPO_ROOT, "benchmarks")):
        raise SystemExit("mkfast bench runs from a source checkout (benchmarks/ not found)")
    sys.path.insert(0, REPO_ROOT)
    available = benchmark_suites()
    for suite in suites or available:
        if suite not in available:
            raise SystemExit(f"mkfast bench: unknown suite {suite!r}; have {available}")
        print(f"== benchmark {suite}", flush=True)
        module = importlib.import_module(f"benchmarks.bench_{suite}")
        module.main(quick=quick, output_root=output_root or (QUICK_RESULTS_ROOT if quick else None))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mkfast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("env", help="versions, extension build, backend choices")
    demo = commands.add_parser("demo", help="the whole project on the embedded digits set")
    demo.add_argument("--quick", action="store_true", help="tiny settings (under 3 minutes on 2 CPU cores)")
    demo.add_argument("--output-dir", default="demo_out")
    demo.add_argument("--stages", nargs="*", choices=list(DEMO_STAGES), help="a subset of the stages, in order")
    demo.add_argument("--device", choices=DEMO_DEVICES, default="auto",
                      help="auto: the GPU when there is one (fused kernels, larger settings), else the CPU")
    bench = commands.add_parser("bench", help="run kernel benchmarks; results under benchmarks/results/<device>/")
    bench.add_argument("suites", nargs="*", help="suite names (default: all)")
    bench.add_argument("--quick", action="store_true", help="small shapes, few repetitions (results to demo_out/)")
    bench.add_argument("--output-root", help="results root (default benchmarks/results)")
    bench.add_argument("--compare", nargs=2, metavar=("RESULTS_A", "RESULTS_B"),
                       help="show two result folders (e.g. benchmarks/results/h100 .../h200) side by side")
    from mkfast.mks2 import commands as mks2_commands

    train_targets = commands.add_parser("train", help="train a model stage").add_subparsers(dest="target",
                                                                                           required=True)
    eval_targets = commands.add_parser("eval", help="evaluate a model").add_subparsers(dest="target", required=True)
    mks2_commands.add_train_parsers(train_targets)
    from mkfast.racm3 import commands as racm3_commands

    racm3_commands.add_train_parser(train_targets)
    mks2_commands.add_eval_parsers(eval_targets)
    from mkfast.racm3 import inference_commands as racm3_inference_commands

    generate_targets = commands.add_parser("generate", help="generate with a trained model").add_subparsers(
        dest="target", required=True)
    racm3_inference_commands.add_generate_parsers(generate_targets)
    racm3_inference_commands.add_eval_parsers(eval_targets)
    arguments = parser.parse_args(argv)
    if arguments.command == "env":
        print(environment_report())
    elif arguments.command == "demo":
        from mkfast.demo import demo_device, run_demo

        try:
            demo_device(arguments.device)
        except RuntimeError as error:
            raise SystemExit(str(error)) from None
        outcome = run_demo(arguments.output_dir, quick=arguments.quick, stages=arguments.stages,
                           device=arguments.device)
        if outcome["failed"]:
            raise SystemExit(1)
    elif arguments.command == "bench" and arguments.compare:
        sys.path.insert(0, REPO_ROOT)
        from benchmarks.common import compare

        print(compare(*arguments.compare))
    elif arguments.command == "bench":
        run_benchmarks(arguments.suites, arguments.quick, arguments.output_root)
    elif arguments.command == "train" and arguments.target.startswith("mks2-"):
        mks2_commands.handle_train(arguments)
    elif arguments.command == "train" and arguments.target == "racm3":
        racm3_commands.run_from_arguments(arguments)
    elif arguments.command == "eval" and arguments.target == "mks2":
        mks2_commands.handle_eval(arguments)
    elif arguments.command == "generate" and arguments.target == "racm3":
        racm3_inference_commands.handle_generate(arguments)
    elif arguments.command == "eval" and arguments.target == "racm3":
        racm3_inference_commands.handle_eval(arguments)


if __name__ == "__main__":
    main()

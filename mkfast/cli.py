"""The `mkfast` command: `mkfast env`, `mkfast bench`, `mkfast audit`, and the model pipelines' commands."""

from __future__ import annotations

import argparse
import glob
import os
import sys

from mkfast.bench import QUICK_RESULTS_ROOT, benchmark_suites, compare, run_benchmarks  # noqa: F401
from mkfast.demo import DEVICES as DEMO_DEVICES
from mkfast.demo import STAGES as DEMO_STAGES
from mkfast.environment import environment_report
from mkfast.errors import EXIT_INTERRUPTED, EXIT_RUNTIME_ERROR, EXIT_USAGE_ERROR, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse errors as one line, ``mkfast: error: train racm3: argument --steps: ...`` (exit 2).

    Subcommand parsers are built as this class too (argparse's subparsers take the parent's class).
    """

    def error(self, message: str):
        command = self.prog.removeprefix("mkfast").strip()
        self.exit(EXIT_USAGE_ERROR, f"mkfast: error: {command + ': ' if command else ''}{message} "
                                    f"(see '{self.prog} --help')\n")


# Errors whose message is meant for the user as it is; any other type is named in the one line.
EXPECTED_ERRORS = (ValueError, TypeError, OSError, RuntimeError, ImportError)


def _one_line(error: BaseException) -> str:
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if isinstance(error, EXPECTED_ERRORS) and not isinstance(error, KeyError) and message:
        return message
    return f"{type(error).__name__}: {message} (unexpected: rerun with --debug for the traceback)"


def main(argv: list[str] | None = None) -> None:
    """The entry point: an error prints one line ``mkfast: error: ...`` and exits 2 (usage: a bad flag,
    value or path) or 1 (anything else while running); ``--debug``, anywhere, shows the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        _run([argument for argument in argv if argument != "--debug"])
    except KeyboardInterrupt:
        if debug:
            raise
        print("mkfast: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except SystemExit as exit_request:
        if isinstance(exit_request.code, str) and not debug:
            # A command's raise SystemExit("message"): Python prints the message and exits 1.
            raise SystemExit(f"mkfast: error: {exit_request.code}") from None
        raise
    except Exception as error:
        if debug:
            raise
        print(f"mkfast: error: {_one_line(error)}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE_ERROR if isinstance(error, UsageError) else EXIT_RUNTIME_ERROR) from None


def _run(argv: list[str]) -> None:
    parser = _Parser(prog="mkfast", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (accepted anywhere on the line)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("env", help="versions, extension build, backend choices")
    demo = commands.add_parser("demo", help="the whole project on the embedded digits set")
    demo.add_argument("--quick", action="store_true", help="tiny settings (under 3 minutes on 2 CPU cores)")
    demo.add_argument("--output-dir", default="demo_out")
    demo.add_argument("--stages", nargs="*", choices=list(DEMO_STAGES),
                      help="a subset of the stages, in order")
    demo.add_argument("--device", choices=DEMO_DEVICES, default="auto",
                      help="auto: the GPU when there is one (fused kernels, larger settings), else the CPU")
    demo.add_argument("--quiet", action="store_true",
                      help="no stage lines or progress bars, only the summary")
    bench = commands.add_parser("bench",
                                help="run kernel benchmarks; results under benchmarks/results/<device>/")
    bench.add_argument("suites", nargs="*", help="suite names (default: all)")
    bench.add_argument("--quick", action="store_true",
                       help="small shapes, few repetitions (results to demo_out/)")
    bench.add_argument("--output-root", help="results root (default benchmarks/results)")
    bench.add_argument("--compare", nargs=2, metavar=("RESULTS_A", "RESULTS_B"),
                       help="show two result folders (e.g. benchmarks/results/h100 .../h200) side by side")
    from mkfast import audit
    from mkfast.mks2 import commands as mks2_commands

    audit.add_arguments(commands.add_parser("audit",
                                            help="every kernel's sm_90a machine code, read (no GPU)"))
    train_targets = commands.add_parser("train", help="train a model stage").add_subparsers(dest="target",
                                                                                           required=True)
    eval_targets = commands.add_parser("eval", help="evaluate a model").add_subparsers(dest="target",
                                                                                      required=True)
    mks2_commands.add_train_parsers(train_targets)
    from mkfast.racm3 import commands as racm3_commands

    racm3_commands.add_train_parser(train_targets)
    mks2_commands.add_eval_parsers(eval_targets)
    from mkfast.racm3 import inference_commands as racm3_inference_commands
    from mkfast.racm3 import inference_demo_commands as racm3_demo_commands

    generate_targets = commands.add_parser("generate", help="generate with a trained model").add_subparsers(
        dest="target", required=True)
    racm3_inference_commands.add_generate_parsers(generate_targets)
    racm3_demo_commands.add_eval_parsers(eval_targets)
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
                           device=arguments.device, quiet=arguments.quiet)
        if outcome["failed"]:
            raise SystemExit(1)
    elif arguments.command == "bench" and arguments.compare:
        for folder in arguments.compare:
            if not glob.glob(os.path.join(folder, "*.json")):
                missing = "does not exist" if not os.path.exists(folder) else "holds no result files (*.json)"
                raise UsageError(f"bench --compare: {folder} {missing}")
        print(compare(*arguments.compare))
    elif arguments.command == "bench":
        run_benchmarks(arguments.suites, arguments.quick, arguments.output_root)
    elif arguments.command == "audit":
        audit.run_from_arguments(arguments)
    elif arguments.command == "train" and arguments.target.startswith("mks2-"):
        mks2_commands.handle_train(arguments)
    elif arguments.command == "train" and arguments.target == "racm3":
        racm3_commands.run_from_arguments(arguments)
    elif arguments.command == "eval" and arguments.target == "mks2":
        mks2_commands.handle_eval(arguments)
    elif arguments.command == "generate" and arguments.target == "racm3":
        racm3_inference_commands.handle_generate(arguments, racm3_demo_commands.load_pipeline)
    elif arguments.command == "eval" and arguments.target == "racm3":
        racm3_demo_commands.handle_eval(arguments)


if __name__ == "__main__":
    main()

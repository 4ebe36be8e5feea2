"""The RA-CM3 commands that read a demo run: `mkfast eval racm3` and `generate racm3` on a demo run.

    mkfast eval racm3 --run-dir DEMO_RUN --output-dir out [--quick]

A demo run (results.json, retrieval/ and no_retrieval/ generators) is read by the inference
demo, which rebuilds components an older demo run did not save; the metrics compare the
demo's two generators, so ``eval racm3`` takes demo runs only. A `mkfast train racm3` run is
read by :func:`mkfast.racm3.inference_commands.load_pipeline`.
"""

from __future__ import annotations

import argparse
import json
import os

from mkfast.errors import UsageError
from mkfast.racm3.inference import RACM3Inference
from mkfast.racm3.inference_commands import load_pipeline as load_training_run

DEMO_RESULTS = "results.json"


def is_demo_run(run_dir: str) -> bool:
    return os.path.exists(os.path.join(run_dir, DEMO_RESULTS))


def load_pipeline(run_dir: str, variant: str = "retrieval", cache_dir: str | None = None) -> RACM3Inference:
    """A pipeline from a demo run (variant: "retrieval" | "no_retrieval") or a training run."""
    if not is_demo_run(run_dir):
        return load_training_run(run_dir)
    from mkfast.racm3.inference_demo import load_demo_run
    from mkfast.racm3.retrieval import RetrievalCorpus

    run = load_demo_run(run_dir, cache_dir=cache_dir)
    train = run["train"]
    corpus = RetrievalCorpus(run["vocabulary"], run["encoder"], train.captions, train.images,
                             run["tokenizer"].encode(train.images))
    # The demo calibrates the diversity filter's threshold to its encoder; sample with the same one.
    return RACM3Inference(run["generators"][variant], corpus, run["tokenizer"],
                          threshold=run["summary"]["threshold"])


def add_eval_parsers(targets) -> None:
    parser = targets.add_parser("racm3", help="RA-CM3 inference metrics on the digits demo run")
    parser.add_argument("--run-dir", required=True, help="the RA-CM3 demo's output dir")
    parser.add_argument("--output-dir", default="racm3_eval")
    parser.add_argument("--quick", action="store_true", help="few prompts and samples")


def handle_eval(arguments: argparse.Namespace) -> dict:
    from mkfast.racm3.inference_demo import run_inference_demo

    if not is_demo_run(arguments.run_dir):
        raise UsageError(f"mkfast eval racm3: --run-dir {arguments.run_dir} is not an RA-CM3 demo run (no "
                         f"{DEMO_RESULTS}): the metrics compare a demo's retrieval and no-retrieval "
                         "generators. For a `mkfast train racm3` run use `mkfast generate racm3 --run-dir`")
    summary = run_inference_demo(arguments.run_dir, arguments.output_dir, quick=arguments.quick)
    print(json.dumps({key: summary[key] for key in ("racm3_k2", "racm3_k0", "cm3_k0", "k_shot")}, indent=2))
    return summary

"""Runs killed at their dangerous points resume to the uninterrupted run; bad configs fail before building.

Kills are injected at named points of mkfast.training (``fault_point``) by a hook that raises
a BaseException: like SIGKILL, it skips every ``except Exception`` clean-up, so the files are
left as a kill at that instant leaves them (a temporary not yet renamed, an append cut short).
"""

import json
import os

import pytest
import torch
from test_mks2_training import CAPTIONS, INSTRUCTIONS, _tiny_mks2
from test_racm3_trainer import _corpus, _trainer

from mkfast import training
from mkfast.errors import UsageError
from mkfast.mks2.stages import CaptionData, stage1_loss_fn
from mkfast.racm3.trainer import Trainer
from mkfast.training import fault_hook, read_metrics


class SimulatedKill(BaseException):
    pass


def kill_at(point: str, occurrence: int = 1):
    """A hook that kills the run the ``occurrence``-th time it reaches ``point``."""
    seen = []

    def hook(name: str) -> None:
        if name == point:
            seen.append(name)
            if len(seen) == occurrence:
                raise SimulatedKill(point)
    return fault_hook(hook)


def _losses(rows):
    return [(row["step"], row["loss"], row["retrieved_tokens"]) for row in rows]


@pytest.fixture(scope="module")
def corpus():
    return _corpus()


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """7 steps, checkpoints at 3, 6 and 7."""
    directory = tmp_path_factory.mktemp("straight")
    rows = _trainer(Trainer, corpus, directory).train()
    assert _losses(read_metrics(directory / "metrics.jsonl")) == _losses(rows)
    return _losses(rows)


def _resume_and_compare(corpus, directory, uninterrupted):
    _trainer(Trainer, corpus, directory).train()
    assert _losses(read_metrics(directory / "metrics.jsonl")) == uninterrupted
    assert not [name for name in os.listdir(directory) if name.endswith(training.TEMPORARY_SUFFIX)]
    assert len(training.checkpoint_paths(str(directory))) == training.CHECKPOINTS_KEPT


def test_kill_while_resume_rewrites_the_metrics_keeps_their_history(corpus, uninterrupted, tmp_path):
    # Dies saving step 6: checkpoint 3, metrics 0..5.
    with kill_at("checkpoint_written", occurrence=2), pytest.raises(SimulatedKill):
        _trainer(Trainer, corpus, tmp_path).train()
    with kill_at("metrics_rewrite"), pytest.raises(SimulatedKill):
        _trainer(Trainer, corpus, tmp_path).train()
    # The old file is whole: the rewrite went to a temporary that was never renamed.
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == list(range(6))
    _resume_and_compare(corpus, tmp_path, uninterrupted)


def test_kill_mid_checkpoint_resumes_from_the_previous_one(corpus, uninterrupted, tmp_path):
    with kill_at("checkpoint_written", occurrence=3), pytest.raises(SimulatedKill):  # the step-7 save
        _trainer(Trainer, corpus, tmp_path).train()
    assert os.path.exists(tmp_path / ("checkpoint_00000007.pt" + training.TEMPORARY_SUFFIX))
    assert [os.path.basename(path) for path in training.checkpoint_paths(str(tmp_path))] == [
        "checkpoint_00000003.pt", "checkpoint_00000006.pt"]
    _resume_and_compare(corpus, tmp_path, uninterrupted)


def test_truncated_latest_checkpoint_falls_back_to_the_previous_with_a_warning(corpus, uninterrupted,
                                                                               tmp_path):
    with kill_at("checkpoint_written", occurrence=3), pytest.raises(SimulatedKill):
        _trainer(Trainer, corpus, tmp_path).train()
    latest = tmp_path / "checkpoint_00000006.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # a copy cut short, a disk that filled up
    with pytest.warns(UserWarning, match="checkpoint_00000006.pt cannot be read"):
        _trainer(Trainer, corpus, tmp_path).train()
    assert _losses(read_metrics(tmp_path / "metrics.jsonl")) == uninterrupted


def test_a_cut_last_metrics_line_does_not_block_resume(corpus, uninterrupted, tmp_path):
    with kill_at("checkpoint_written", occurrence=2), pytest.raises(SimulatedKill):
        _trainer(Trainer, corpus, tmp_path).train()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"stage": "racm3", "step": 6, "lo')  # killed mid-append
    with pytest.warns(UserWarning, match="dropping its last line"):
        _resume_and_compare(corpus, tmp_path, uninterrupted)


def test_no_checkpoint_can_be_read_is_an_error_naming_them(corpus, tmp_path):
    _trainer(Trainer, corpus, tmp_path).train()
    for path in training.checkpoint_paths(str(tmp_path)):
        with open(path, "r+b") as handle:
            handle.truncate(100)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no checkpoint in .* can be read"):
        _trainer(Trainer, corpus, tmp_path).train()


def _mks2_run(directory, steps, hook=None):
    model, tokenizer = _tiny_mks2()
    loss_fn = stage1_loss_fn(model, tokenizer, CaptionData(INSTRUCTIONS.images, CAPTIONS), 3)
    from mkfast.mks2.trainer import Trainer as MKS2Trainer
    from mkfast.mks2.trainer import TrainerConfig

    config = TrainerConfig(output_dir=str(directory), steps=steps, learning_rate=1e-2, checkpoint_every=2,
                           progress=False)
    trainer = MKS2Trainer(model, loss_fn, config)
    if hook is None:
        trainer.train()
    else:
        with hook, pytest.raises(SimulatedKill):
            trainer.train()
    return model


def test_mks2_killed_mid_checkpoint_and_mid_rewrite_resumes_exactly(tmp_path):
    straight = _mks2_run(tmp_path / "straight", 5)
    _mks2_run(tmp_path / "killed", 5, kill_at("checkpoint_written", occurrence=2))  # the step-4 save
    _mks2_run(tmp_path / "killed", 5, kill_at("metrics_rewrite"))
    resumed = _mks2_run(tmp_path / "killed", 5)
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    straight_rows = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert read_metrics(tmp_path / "killed" / "metrics.jsonl") == straight_rows
    assert [row["step"] for row in straight_rows] == list(range(5))


def test_a_legacy_mks2_run_directory_resumes(tmp_path):
    """MKS2 runs used to write one checkpoint.pt ({"trainable": ...}) and count metric rows from 1."""
    straight = _mks2_run(tmp_path / "straight", 4)
    _mks2_run(tmp_path / "legacy", 2)
    state = torch.load(training.latest_checkpoint(str(tmp_path / "legacy")), weights_only=True)
    legacy = {"step": state["step"], "config": state["config"], "trainable": state.pop("model"),
              "optimizer": state["optimizer"], "scheduler": state["scheduler"]}
    for path in training.checkpoint_paths(str(tmp_path / "legacy")):
        os.remove(path)
    torch.save(legacy, tmp_path / "legacy" / training.LEGACY_CHECKPOINT)
    rows = read_metrics(tmp_path / "legacy" / "metrics.jsonl")
    one_based = "".join(json.dumps(row | {"step": row["step"] + 1}) + "\n" for row in rows)
    (tmp_path / "legacy" / "metrics.jsonl").write_text(one_based)
    resumed = _mks2_run(tmp_path / "legacy", 4)
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    straight_rows = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert read_metrics(tmp_path / "legacy" / "metrics.jsonl") == straight_rows
    assert not os.path.exists(tmp_path / "legacy" / training.LEGACY_CHECKPOINT)


# ----------------------------------------------------------------------------- the RA-CM3 pipeline
def _racm3_config(directory, **overrides):
    from mkfast.racm3.commands import load_config

    config = load_config(None, {"training.output_dir": str(directory), "data_limit": 24, "training.steps": 3,
                                "training.batch_size": 2, "training.checkpoint_every": 2,
                                "vq_training.steps": 1, "clip_training.steps": 1, **overrides})
    config.training.progress = False
    return config


@pytest.fixture(scope="module")
def racm3_run(tmp_path_factory):
    """(directory, records) of one uninterrupted `mkfast train racm3` run; tests work on copies."""
    from mkfast.racm3.commands import train_racm3

    directory = tmp_path_factory.mktemp("racm3_straight")
    return directory, train_racm3(_racm3_config(directory))


def _copy_run(run, destination):
    import shutil

    shutil.copytree(run[0], destination)
    return destination


@pytest.mark.slow
def test_racm3_run_killed_between_its_config_and_its_components_resumes_exactly(racm3_run, tmp_path):
    from mkfast.racm3.commands import train_racm3
    from mkfast.racm3.inference_commands import load_pipeline

    with kill_at("config_written"), pytest.raises(SimulatedKill):
        train_racm3(_racm3_config(tmp_path))
    assert os.listdir(tmp_path) == ["config.json"]  # written whole, before the components
    again = train_racm3(_racm3_config(tmp_path))
    assert _losses(again) == _losses(racm3_run[1])
    assert len(load_pipeline(str(tmp_path)).corpus) == 24


@pytest.mark.slow
def test_racm3_run_with_an_empty_config_json_left_by_an_old_kill_is_repaired(racm3_run, tmp_path):
    from mkfast.racm3.commands import train_racm3
    from mkfast.racm3.inference_commands import load_pipeline

    directory = _copy_run(racm3_run, tmp_path / "run")
    (directory / "config.json").write_text("")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_pipeline(str(directory))
    with pytest.warns(UserWarning, match="config.json cannot be read"):
        records = train_racm3(_racm3_config(directory, **{"training.steps": 4}))
    assert [record["step"] for record in records] == [3]
    assert len(load_pipeline(str(directory)).corpus) == 24


def _untrained_run(directory, **overrides):
    """A run directory as `mkfast train racm3` lays it out, without training: config.json and a
    stand-in components.pt (both checks below fail before the components are read)."""
    from dataclasses import asdict

    directory.mkdir()
    config = _racm3_config(directory, **overrides)
    (directory / "config.json").write_text(json.dumps(asdict(config)))
    (directory / "components.pt").write_bytes(b"PK\x03\x04 cut short")
    return directory


def test_racm3_refuses_components_built_from_another_config(tmp_path):
    from mkfast.racm3.commands import train_racm3

    directory = _untrained_run(tmp_path / "run")
    with pytest.raises(ValueError, match="components built with another text_vocabulary_size"):
        train_racm3(_racm3_config(directory, text_vocabulary_size=280))


def test_truncated_components_and_eval_of_a_training_run_are_clear_errors(tmp_path):
    import argparse

    from mkfast.racm3.inference_commands import load_pipeline
    from mkfast.racm3.inference_demo_commands import handle_eval

    directory = _untrained_run(tmp_path / "run")
    with pytest.raises(ValueError, match="is not an RA-CM3 demo run"):
        handle_eval(argparse.Namespace(run_dir=str(directory), output_dir=str(tmp_path / "eval"), quick=True))
    with pytest.raises(ValueError, match="components.pt cannot be read"):
        load_pipeline(str(directory))
    with pytest.raises(UsageError, match="neither results.json"):
        load_pipeline(str(tmp_path))


# ----------------------------------------------------------------------------- configs, both pipelines
RACM3_BAD = [
    ([1, 2], {}, ValueError, "expected a JSON object of RunConfig fields, got list"),
    ({"trainig": {"steps": 3}}, {}, ValueError, "unknown field 'trainig' (did you mean 'training'?)"),
    ({"training": {"stpes": 3}}, {}, ValueError, "unknown field 'stpes' (did you mean 'steps'?)"),
    ({"training": {"steps": "ten"}}, {}, ValueError, "training.steps: expected an integer, got 'ten'"),
    ({"training": {"learning_rate": "fast"}}, {}, ValueError, "learning_rate: expected a number"),
    ({"vq": {"channel_multipliers": 2}}, {}, ValueError, "vq.channel_multipliers: expected a list"),
    ({}, {"training.steps": -3}, ValueError, "steps (--steps) must be > 0, got -3"),
    ({}, {"training.checkpoint_every": 0}, ValueError, "checkpoint_every (--checkpoint-every) must be > 0"),
    ({}, {"training.batch_size": 0}, ValueError, "batch_size (--batch-size) must be > 0"),
    ({"training": {"gradient_accumulation": 0}}, {}, ValueError, "gradient_accumulation"),
    ({"training": {"schedule": "cosine"}}, {}, ValueError, "schedule (--schedule) must be one of"),
    ({}, {"data": "no/such/folder"}, UsageError, "data (--data) must be 'digits', a folder"),
    ({}, {"data": "no/such/shards/*.tar"}, UsageError, "matches no shard"),
    ({"vq_checkpoint": "no/such/vq.ckpt"}, {}, UsageError, "vq_checkpoint 'no/such/vq.ckpt' does not exist"),
]


@pytest.mark.parametrize("values, overrides, error, phrase", RACM3_BAD)
def test_racm3_bad_configs_are_refused_before_anything_is_built(tmp_path, values, overrides, error, phrase):
    from mkfast.racm3.commands import load_config

    path = tmp_path / "run.json"
    path.write_text(json.dumps(values))
    with pytest.raises(error) as raised:
        load_config(str(path), overrides)
    assert phrase in str(raised.value)


def test_racm3_config_of_an_older_run_reads_grad_clip_as_max_grad_norm(tmp_path):
    from mkfast.racm3.commands import load_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"training": {"grad_clip": 0.5, "steps": 9}}))
    config = load_config(str(path), {})
    assert config.training.max_grad_norm == 0.5 and config.training.steps == 9


def _mks2_parse(argv):
    import argparse

    from mkfast.mks2 import commands

    parser = argparse.ArgumentParser()
    commands.add_train_parsers(parser.add_subparsers(dest="target"))
    return commands._config_from(parser.parse_args(argv), commands.MKS2TrainConfig)


MKS2_BAD = [
    (["--steps", "-3"], ValueError, "steps (--steps) must be > 0, got -3"),
    (["--checkpoint-every", "0"], ValueError, "checkpoint_every (--checkpoint-every) must be > 0"),
    (["--batch-size", "0"], ValueError, "batch_size (--batch-size) must be > 0"),
    (["--gradient-accumulation", "0"], ValueError, "(--gradient-accumulation) must be > 0"),
    (["--dtype", "float128"], ValueError, "dtype (--dtype) must be one of"),
    (["--language-model", "no/such/llama"], UsageError, "(--language-model) 'no/such/llama' does not"),
    (["--vision-model", "no/such/blip2"], UsageError, "'no/such/blip2' does not exist"),
    (["--data", "no_such.jsonl"], UsageError, "data (--data) must be 'digits' or a JSONL file"),
    (["--adapters-from", "no/such/adapters"], UsageError, "(--adapters-from) 'no/such/adapters' is not"),
]


@pytest.mark.parametrize("argv, error, phrase", MKS2_BAD)
def test_mks2_bad_flags_are_refused_before_anything_is_built(argv, error, phrase):
    with pytest.raises(error) as raised:
        _mks2_parse(["mks2-stage1", *argv])
    assert phrase in str(raised.value)


@pytest.mark.parametrize("values, phrase", [
    ([{"steps": 3}], "expected a JSON object of MKS2TrainConfig fields, got list"),
    ({"trainig": {}}, "unknown field 'trainig'"),
    ({"steps": "ten"}, "steps: expected an integer, got 'ten'"),
    ({"resume": "yes"}, "resume: expected true or false"),
])
def test_mks2_bad_config_files_are_refused(tmp_path, values, phrase):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError) as raised:
        _mks2_parse(["mks2-stage1", "--config", str(path)])
    assert phrase in str(raised.value)


def test_mks2_empty_data_file_is_a_clear_error(tmp_path):
    from mkfast.mks2.commands import _stage_data

    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    config = _mks2_parse(["mks2-stage1", "--data", str(data)])
    with pytest.raises(ValueError, match="empty.jsonl holds no records"):
        _stage_data(config, 1, model=None)


def test_generate_refuses_zero_samples_as_a_usage_error(capsys):
    from mkfast.cli import main

    with pytest.raises(SystemExit) as raised:
        main(["generate", "racm3", "--run-dir", ".", "--caption", "a digit", "--samples", "0"])
    assert raised.value.code == 2 and "--samples: must be >= 1, got 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a real SIGKILL
KILLED_CHILD = """
import os, signal, sys
from mkfast.training import fault_hook
from mkfast.racm3.trainer import Trainer
from test_racm3_trainer import _corpus, _trainer

point, occurrence, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen = []

def hook(name):
    if name == point:
        seen.append(name)
        if len(seen) == occurrence:
            os.kill(os.getpid(), signal.SIGKILL)

with fault_hook(hook):
    _trainer(Trainer, _corpus(), directory).train()
"""


@pytest.mark.slow
def test_sigkilled_runs_resume_to_the_uninterrupted_run(corpus, uninterrupted, tmp_path):
    """The same points as above, killed for real (SIGKILL: no clean-up, no flush) in a child process."""
    import signal
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    environment = {**os.environ, "PYTHONPATH": tests, "OMP_NUM_THREADS": "1"}
    for point, occurrence in (("checkpoint_written", 2), ("metrics_rewrite", 1)):
        child = subprocess.run([sys.executable, "-c", KILLED_CHILD, point, str(occurrence), str(tmp_path)],
                               env=environment, capture_output=True, text=True, timeout=600)
        assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    # Killed saving step 6, then killed again rewriting the metrics on resume: history 0..5 intact.
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == list(range(6))
    _resume_and_compare(corpus, tmp_path, uninterrupted)

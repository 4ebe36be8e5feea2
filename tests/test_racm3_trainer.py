"""RA-CM3 trainer: schedule, data order, exact resume after a kill, `mkfast train racm3` on 2 gloo ranks."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from test_racm3_retrieval import PartEncoder

from mkfast.racm3.generator import GeneratorConfig, build_generator
from mkfast.racm3.retrieval import RetrievalCorpus, SequenceOptions
from mkfast.racm3.trainer import (
    Trainer,
    TrainingConfig,
    batch_example_indices,
    learning_rate_factor,
    read_metrics,
)
from mkfast.racm3.vocabulary import CM3Vocabulary

COUNT, CODES = 24, 10
TINY = GeneratorConfig(hidden_size=32, num_layers=2, num_heads=2, num_key_value_heads=2, intermediate_size=64,
                       max_sequence_length=128)


def test_schedule_warms_up_then_decays_linearly():
    factors = [learning_rate_factor(step, 4, 12) for step in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[8] == 0.5 and factors[11] == 0.125


def test_batch_order_is_a_permutation_per_epoch_and_reproducible():
    epoch = [index for step in range(6) for index in batch_example_indices(step, 4, 24, seed=3)]
    assert sorted(epoch) == list(range(24))
    assert batch_example_indices(7, 4, 24, seed=3) == batch_example_indices(7, 4, 24, seed=3)
    assert batch_example_indices(0, 4, 24, seed=3) != batch_example_indices(0, 4, 24, seed=4)


def _corpus():
    generator = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(COUNT, 8, generator=generator), dim=-1)
    texts = [f"caption {index}" for index in range(COUNT)]
    images = torch.arange(COUNT, dtype=torch.float32).view(COUNT, 1, 1, 1).expand(COUNT, 3, 2, 2)
    codes = torch.randint(0, CODES, (COUNT, 3, 3), generator=generator)
    vocabulary = CM3Vocabulary.from_corpus(texts, CODES, text_vocabulary_size=270)
    encoder = PartEncoder(F.normalize(memory + 0.5, dim=-1), F.normalize(memory - 0.5, dim=-1))
    return RetrievalCorpus(vocabulary, encoder, texts, images, codes, memory)


class Killed(RuntimeError):
    pass


class KilledTrainer(Trainer):
    """Dies right after step ``kill_after`` has run and been logged, before the next checkpoint."""

    kill_after = 4

    def train_step(self):
        if self.step == self.kill_after + 1:
            raise Killed
        return super().train_step()


def _trainer(cls, corpus, output_dir):
    torch.manual_seed(0)
    model = build_generator(len(corpus.vocabulary), TINY, corpus.vocabulary.pad_id)
    config = TrainingConfig(steps=7, batch_size=4, learning_rate=3e-3, warmup_steps=2, checkpoint_every=3,
                            output_dir=str(output_dir), progress=False)
    return cls(model, corpus, config, SequenceOptions(max_sequence_length=128))


def test_resume_after_a_kill_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    corpus = _corpus()
    uninterrupted = _trainer(Trainer, corpus, tmp_path / "straight").train()
    with pytest.raises(Killed):
        _trainer(KilledTrainer, corpus, tmp_path / "killed").train()
    # Killed after step 4: the last checkpoint is at step 3, metrics run to step 4.
    logged = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [record["step"] for record in logged] == [0, 1, 2, 3, 4]
    resumed_trainer = _trainer(Trainer, corpus, tmp_path / "killed")
    resumed = resumed_trainer.train()
    assert [record["step"] for record in resumed] == [3, 4, 5, 6]
    logged = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [record["step"] for record in logged] == list(range(7))
    for straight, again in zip(uninterrupted, logged, strict=True):
        assert again["loss"] == straight["loss"]  # exact: the same batches, draws and states
        assert again["retrieved_tokens"] == straight["retrieved_tokens"]
    assert os.path.exists(tmp_path / "killed" / "loss.png")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_command(arguments, output_dir, nproc=1):
    launcher = [sys.executable, "-m", "mkfast.racm3.commands"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", str(_free_port()), "-m", "mkfast.racm3.commands"]
    config = {"data_limit": 48, "vq_training": {"steps": 2, "batch_size": 8}, "clip_training": {"steps": 2,
              "batch_size": 8}, "generator": {"hidden_size": 32, "num_layers": 1, "num_heads": 2,
              "num_key_value_heads": 2, "intermediate_size": 64, "max_sequence_length": 256},
              "training": {"steps": 3, "batch_size": 4, "checkpoint_every": 2}}
    config_path = output_dir / "run.json"
    output_dir.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config))
    # CPU and gloo on every machine: a GPU machine with one GPU cannot hold two NCCL ranks.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # Own session, so that a hung run is killed with all its workers (no orphans left holding a port).
    process = subprocess.Popen(launcher + ["--config", str(config_path), "--output-dir", str(output_dir),
                                           "--no-progress"] + arguments,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0, stderr[-3000:]
    return stdout


@pytest.mark.slow
def test_two_process_gloo_runs_ddp_and_fsdp2_alike_with_full_checkpoints(tmp_path):
    runs = {}
    for name, flags in (("ddp", []), ("fsdp", ["--fsdp"])):
        output_dir = tmp_path / name
        stdout = _run_command(flags, output_dir, nproc=2)
        assert "trained to step 3" in stdout
        records = read_metrics(output_dir / "metrics.jsonl")
        assert [record["step"] for record in records] == [0, 1, 2]  # rank 0 logs once per step
        state = torch.load(output_dir / "checkpoint_00000003.pt", weights_only=False)
        assert state["step"] == 3
        assert (output_dir / "components.pt").exists() and (output_dir / "loss.png").exists()
        runs[name] = (records, state)
    (ddp_records, ddp_state), (fsdp_records, fsdp_state) = runs["ddp"], runs["fsdp"]
    # Same data, same initial weights: only the gradient reduction (all-reduce vs reduce-scatter) differs.
    torch.testing.assert_close([r["loss"] for r in fsdp_records], [r["loss"] for r in ddp_records],
                               rtol=1e-4, atol=1e-5)
    # FSDP2's checkpoint holds full (unsharded) tensors under the plain model's names.
    assert fsdp_state["model"].keys() == ddp_state["model"].keys()
    for name, tensor in ddp_state["model"].items():
        assert not hasattr(fsdp_state["model"][name], "placements"), name
        torch.testing.assert_close(fsdp_state["model"][name], tensor, rtol=1e-3, atol=1e-4)


def test_config_file_and_flags_map_onto_run_config(tmp_path, capsys):
    from mkfast.cli import main as mkfast_main
    from mkfast.racm3.commands import load_config

    path = tmp_path / "run.json"
    path.write_text(json.dumps({"vq": {"codebook_size": 128, "channel_multipliers": [1, 2]},
                                "training": {"steps": 9}}))
    overrides = {"training.batch_size": 3, "sequence.max_retrieved": 0, "data_limit": None}
    config = load_config(str(path), overrides)
    assert config.vq.codebook_size == 128 and config.vq.channel_multipliers == (1, 2)
    assert config.vq.base_channels == 32  # unspecified fields keep the demo defaults
    assert config.training.steps == 9 and config.training.batch_size == 3
    assert config.sequence.max_retrieved == 0
    with pytest.raises(SystemExit) as exit_info:
        mkfast_main(["train", "racm3", "--help"])
    assert exit_info.value.code == 0 and "--max-retrieved" in capsys.readouterr().out


def test_right_padded_batches_need_no_attention_mask():
    """The trainer feeds no attention_mask (so the plain-causal kernel path runs): exact for right padding."""
    corpus = _corpus()
    batch = corpus.training_batch(list(range(6)), SequenceOptions(max_sequence_length=128),
                                  torch.Generator().manual_seed(0))
    assert bool((batch.attention_mask == 0).any())  # the batch has padding
    torch.manual_seed(0)
    model = build_generator(len(corpus.vocabulary), TINY, corpus.vocabulary.pad_id).eval()
    with torch.no_grad():
        masked = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        unmasked = model(input_ids=batch.input_ids).logits
    real = batch.attention_mask.bool()
    assert_close(unmasked[real], masked[real], dtype=torch.float32)


@pytest.mark.cuda
def test_generator_on_gpu_uses_mkfast_attention_and_trains_in_bf16(tmp_path):
    from mkfast.racm3.generator import attention_implementation

    assert attention_implementation("auto", "cuda") == "mkfast"
    corpus = _corpus()
    torch.manual_seed(0)
    model = build_generator(len(corpus.vocabulary), TINY, corpus.vocabulary.pad_id, device="cuda")
    assert model.config._attn_implementation == "mkfast"
    reference = build_generator(len(corpus.vocabulary), replace(TINY, attention_implementation="sdpa"),
                                corpus.vocabulary.pad_id, device="cuda")
    reference.load_state_dict(model.state_dict())
    input_ids = torch.randint(0, len(corpus.vocabulary), (3, 77), device="cuda")
    with torch.no_grad():
        assert_close(model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits,
                     dtype=torch.float32, scale=10.0)
    config = TrainingConfig(steps=3, batch_size=4, learning_rate=3e-3, warmup_steps=1, checkpoint_every=3,
                            output_dir=str(tmp_path), progress=False)
    records = Trainer(model, corpus, config, SequenceOptions(max_sequence_length=128)).train()
    assert len(records) == 3 and all(math.isfinite(record["loss"]) for record in records)


def test_gradient_accumulation_takes_consecutive_global_batches(tmp_path, monkeypatch):
    """Micro-step m of step s trains on global batch s * accumulation + m: the same data order as
    a run without accumulation, every batch once."""
    corpus = _corpus()
    drawn = []
    original = corpus.training_batch

    def recording(indices, options, generator):
        drawn.append(list(indices))
        return original(indices, options, generator)

    monkeypatch.setattr(corpus, "training_batch", recording)
    torch.manual_seed(0)
    model = build_generator(len(corpus.vocabulary), TINY, corpus.vocabulary.pad_id)
    config = TrainingConfig(steps=2, batch_size=4, gradient_accumulation=2, checkpoint_every=2,
                            output_dir=str(tmp_path), progress=False)
    rows = Trainer(model, corpus, config, SequenceOptions(max_sequence_length=128)).train()
    assert drawn == [batch_example_indices(batch, 4, len(corpus), 0) for batch in range(4)]
    assert [row["step"] for row in rows] == [0, 1] and all(math.isfinite(row["loss"]) for row in rows)

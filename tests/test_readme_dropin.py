"""The README's "Drop-in for Hugging Face models" examples, run as written (a bf16 Llama, CPU)."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
SECTION = "### Drop-in for Hugging Face models"


def dropin_blocks() -> list[str]:
    text = README.read_text()
    start = text.index(SECTION)
    following = [text.find(heading, start + len(SECTION)) for heading in ("\n## ", "\n### ")]
    end = min(position for position in following if position != -1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.DOTALL)


def test_the_readme_dropin_examples_run_as_written_on_a_bf16_model(tmp_path, monkeypatch):
    blocks = dropin_blocks()
    assert len(blocks) == 3  # one-call forms, the layers by hand, FlashAttention conventions
    monkeypatch.chdir(tmp_path)  # the example saves adapters to a relative directory
    namespace: dict = {}
    exec(compile(blocks[0], f"{README.name}: drop-in block 1", "exec"), namespace)
    model = namespace["model"]
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "mkfast"
    assert (tmp_path / "mks2_adapters" / "adapter_config.json").exists()
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora" in name or "router" in name for name in trainable)
    for index, block in enumerate(blocks[1:], start=2):
        exec(compile(block, f"{README.name}: drop-in block {index}", "exec"), namespace)
    assert namespace["other"].model.layers[0].mlp.visual_memory.fc1.weight.dtype == torch.bfloat16
    assert namespace["out"].shape == (21, 4, 32)

"""The small-model training steps both MKS2 demos share: the digits design (mkfast.mks2.demo) and
the entity check (mkfast.mks2.entity_memory). Sized for a CPU: a from-scratch Llama of hidden size 64.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable

import torch

from mkfast.mks2.build import SmallLlamaConfig, small_llama
from mkfast.mks2.evaluation import choice_log_likelihoods, score_item
from mkfast.mks2.inst_lora import apply_inst_lora
from mkfast.mks2.model import MKS2Model
from mkfast.mks2.stages import InstructionData, stage2_loss_fn
from mkfast.mks2.trainer import Trainer, TrainerConfig
from mkfast.mks2.vision import small_vision_adapter
from mkfast.progress import is_quiet

BATCH_SIZE = 16
# A from-scratch model this small learns at rates far above the paper's 1e-4 for Llama-2-7B.
LEARNING_RATE = 3e-3
LORA_RANK, LORA_ALPHA = 8, 16
MODEL = SmallLlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2)


def model_config(tokenizer) -> SmallLlamaConfig:
    return SmallLlamaConfig(**{**MODEL.__dict__, "vocab_size": len(tokenizer)})


def trainer_config(output_dir: str, name: str, steps: int, seed: int, learning_rate: float = LEARNING_RATE):
    return TrainerConfig(output_dir=os.path.join(output_dir, name), steps=steps, learning_rate=learning_rate,
                         warmup_steps=steps // 10, checkpoint_every=steps, seed=seed, progress=not is_quiet())


def pretrain_language_model(language_model, tokenizer, texts: list[str], steps: int, output_dir: str,
                            seed: int):
    """Full-parameter next-token training of the base on ``texts`` (the stand-in for a pretrained Llama)."""
    from mkfast.mks2.losses import next_token_cross_entropy

    def loss_fn(generator):
        indices = torch.randint(len(texts), (BATCH_SIZE,), generator=generator).tolist()
        encoded = tokenizer([texts[index] for index in indices], add_special_tokens=False, padding=True,
                            return_tensors="pt")
        bos = torch.full((BATCH_SIZE, 1), tokenizer.bos_token_id)
        eos = torch.full((BATCH_SIZE, 1), tokenizer.pad_token_id)
        input_ids = torch.cat([bos, encoded["input_ids"], eos], dim=1)
        mask = torch.cat([torch.ones_like(bos), encoded["attention_mask"], torch.zeros_like(eos)], dim=1)
        lengths = mask.sum(dim=1)
        input_ids[torch.arange(BATCH_SIZE), lengths] = tokenizer.eos_token_id  # </s> right after each text
        mask[torch.arange(BATCH_SIZE), lengths] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        device = language_model.device
        logits = language_model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        return {"loss": next_token_cross_entropy(logits, labels.to(device))}

    config = trainer_config(output_dir, "base_pretraining", steps, seed)
    return Trainer(language_model, loss_fn, config, "base pretraining").train(resume=False)


def pretrained_base(config: SmallLlamaConfig, tokenizer, texts: list[str], steps: int, output_dir: str,
                    seed: int, device: torch.device | str = "cpu",
                    ) -> tuple[Callable[[], torch.nn.Module], list[dict]]:
    """Pretrain the base once on ``texts``: (a function giving each arm its own copy of it, the
    pretraining's rows)."""
    base = small_llama(config, tokenizer, seed=seed).to(device)
    rows = pretrain_language_model(base, tokenizer, texts, steps, output_dir, seed)
    state = copy.deepcopy(base.state_dict())

    def fresh_copy():
        model = small_llama(config, tokenizer, seed=seed).to(device)
        model.load_state_dict(state)
        return model

    return fresh_copy, rows


def inst_lora_baseline(language_model, seed: int, device: torch.device | str = "cpu") -> MKS2Model:
    """The paper's INST-LoRA arm: LoRA r=16 on every projection of the plain LLM, only LoRA trainable."""
    hidden_size = language_model.config.hidden_size
    # The vision adapter is never used by the text-only baseline; MKS2Model wants one.
    model = MKS2Model(apply_inst_lora(language_model, seed=seed),
                      small_vision_adapter(hidden_size, seed=seed)).to(device)
    model.freeze_outside_language_model()
    return model


def data_digest(data: InstructionData) -> str:
    """What an arm's stage 2 trains on, as one hash (equal hashes: identical data)."""
    text = json.dumps([data.prompts, data.responses, data.image_indices])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def evaluate_colour_questions(model: MKS2Model, tokenizer, items: list[dict]) -> dict:
    """acc (argmax of the choices' log-likelihoods) and p_correct (the right choice's probability with
    the likelihoods renormalised over the choices), averaged over ``items``."""
    was_training = model.training
    model.eval()
    accuracy, probability = 0.0, 0.0
    for item in items:
        log_likelihoods = choice_log_likelihoods(model, tokenizer, item["question"], item["choices"])
        accuracy += score_item(log_likelihoods, item["choices"], item["answer"])["acc"]
        probability += float(torch.softmax(log_likelihoods, dim=0)[item["answer"]])
    model.train(was_training)
    return {"acc": accuracy / len(items), "p_correct": probability / len(items), "items": len(items)}


def train_stage2(model, tokenizer, data: InstructionData, steps: int, output_dir: str, name: str, seed: int):
    rows = Trainer(model, stage2_loss_fn(model, tokenizer, data, BATCH_SIZE),
                   trainer_config(output_dir, name, steps, seed), f"{name} stage2").train(resume=False)
    return rows, data_digest(data)

"""Preference tuning (train.objective: dpo): the loss and its gradients against TRL's DPOTrainer, the margin rising
on a learnable preference set, the preference formats and their line-numbered errors, and runs through the CLI."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

from tunesmith.chat import TokenizedChat, tokenize_chat
from tunesmith.config import TrainConfig
from tunesmith.train import preference
from tunesmith.train.dataset import PreferencePair
from tunesmith.train.distributed import Processes
from tunesmith.train.loop import StepSetup
from tunesmith.train.plan import Precision

CPU = torch.device("cpu")


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Learnable pairs: the chosen answer is the sum, the rejected one a refusal (lengths differ between pairs)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                     "chosen": [{"role": "assistant", "content": f"The answer is {a + b}."}],
                     "rejected": [{"role": "assistant", "content": "I do not know" + " really" * rng.randint(0, 3)}]})
    return rows


def pairs_of(tokenizer, rows: list[dict]) -> list[PreferencePair]:
    return [PreferencePair(tokenize_chat(tokenizer, [*r["prompt"], *r["chosen"]]),
                           tokenize_chat(tokenizer, [*r["prompt"], *r["rejected"]])) for r in rows]


def trl_inputs(pairs: list[PreferencePair]) -> dict:
    """The same token ids as TRL's collator batches them (prompt ids, then each answer's ids)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    def answer(chat: TokenizedChat) -> tuple[int, int]:  # the supervised span (the whitespace after it is not)
        supervised = [i for i, x in enumerate(chat.labels) if x != -100]
        return supervised[0], supervised[-1] + 1

    examples = []
    for p in pairs:
        (start, end_c), (start_r, end_r) = answer(p.chosen), answer(p.rejected)
        assert start == start_r and p.chosen.input_ids[:start] == p.rejected.input_ids[:start]
        examples.append({"prompt_ids": p.chosen.input_ids[:start], "chosen_ids": p.chosen.input_ids[start:end_c],
                         "rejected_ids": p.rejected.input_ids[start:end_r]})
    return DataCollatorForPreference(pad_token_id=0)(examples)


def trl_trainer(model, tokenizer, tmp_path: Path, loss_type: str, beta: float, peft_config=None):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], bf16=False, use_cpu=True,
                     report_to=[], max_length=None, disable_dropout=True, per_device_train_batch_size=4,
                     dataset_num_proc=None)
    data = Dataset.from_list(preference_rows(4))
    return DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      peft_config=peft_config)


def tunesmith_loss(model, pairs: list[PreferencePair], loss_type: str, beta: float) -> tuple[float, dict]:
    setup = StepSetup(procs=Processes.single(CPU), precision=Precision(torch.float32, None), optimizer="adamw_torch",
                      pad_id=0, packed=False, fused_loss=True)
    dpo = TrainConfig(objective="dpo", dpo={"beta": beta, "loss_type": loss_type}).dpo
    _, _, n, loss_sum, metrics = preference.accumulate(model, setup=setup, dpo=dpo, pairs=pairs,
                                                       indices=list(range(len(pairs))), micro_size=2,
                                                       max_length=512)
    return loss_sum / n, metrics


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_gradients_equal_trl_dpo_trainer(tiny_model_dir, tiny_tokenizer, tmp_path, method, loss_type):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ours = copy.deepcopy(model)
    # LoRA: TRL adds a new adapter and takes the base (adapters off) as the reference, as we do; random adapter
    # weights (not zero-initialised B), so the policy differs from the reference at once
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False) \
        if method == "lora" else None
    trainer = trl_trainer(model, tiny_tokenizer, tmp_path, loss_type, beta=0.5, peft_config=lora)
    pairs = pairs_of(tiny_tokenizer, preference_rows(3, seed=1))
    inputs = trl_inputs(pairs)
    if method == "lora":
        ours = get_peft_model(ours, lora)
        theirs = dict(trainer.model.named_parameters())
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if p.requires_grad:
                    p.copy_(theirs[name])
    else:  # the reference: the initial weights' log-probs, computed before any step
        setup = StepSetup(procs=Processes.single(CPU), precision=Precision(torch.float32, None),
                          optimizer="adamw_torch", pad_id=0, packed=False, fused_loss=True)
        pairs = preference.precompute(ours, pairs, setup=setup, micro_size=2, max_length=512)
    # move the policy away from the initial weights, identically in both copies
    for m in (trainer.model, ours):
        m.train()
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).view_as(p))
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    loss, metrics = tunesmith_loss(ours, pairs, loss_type, beta=0.5)

    assert loss == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(trainer._metrics["train"]["rewards/margins"][-1], abs=1e-5)
    theirs = {n.removeprefix("base_model.model."): p.grad for n, p in trainer.model.named_parameters()
              if p.requires_grad}
    mine = {n.removeprefix("base_model.model."): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert theirs.keys() == mine.keys() and mine
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().max() > 0 for g in mine.values())

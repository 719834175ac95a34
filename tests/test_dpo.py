"""Preference tuning (train.objective: dpo): the loss and its gradients against TRL's DPOTrainer, the margin rising
on a learnable preference set, the preference formats and their line-numbered errors, and runs through the CLI."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
import yaml

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


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_config(tmp_path: Path, model_dir: Path, dataset: Path, **train) -> Path:
    body = {"out_dir": str(tmp_path / "out"), "model": {"name_or_path": str(model_dir)},
            "train": {"objective": "dpo", "dataset": str(dataset), "logging_steps": 1, "save_strategy": "no",
                      "warmup_ratio": 0.0, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                      **train}}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.slow
def test_prepared_pairs_train_and_the_preference_margin_rises(tiny_model_dir, tmp_path):
    """Full fine-tuning on pairs the tiny model can learn to tell apart: the reward margin and the held-out
    win-rate rise from the start (a margin of 0 and a win-rate of 0 at step 0: policy = reference)."""
    from tunesmith.config import load_config
    from tunesmith.data import prepare
    from tunesmith.train import train

    rows = preference_rows(36)
    rows.append(rows[5])  # an exact duplicate pair: removed by prepare
    raw = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = load_config(dpo_config(tmp_path, tiny_model_dir, tmp_path / "prepared", method="full", max_steps=8,
                                 learning_rate=5e-3, eval_strategy="steps", eval_steps=8))
    prepared = prepare(cfg, [raw], out_dir=tmp_path / "prepared")
    assert prepared.removed_by_rule["exact_dedup"] == 1 and prepared.eval_examples >= 2
    first = json.loads((tmp_path / "prepared" / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"input", "preferred_output", "non_preferred_output"}

    result = train(cfg, out_dir=tmp_path / "run")
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    margins = [r["rewards/margins"] for r in steps if r["type"] == "train"]
    assert margins[0] == pytest.approx(0.0, abs=1e-5)  # the first step's policy is the reference
    assert margins[-1] > 1.0 and margins[-1] > max(margins[:4])
    assert all(k in steps[0] for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies"))
    assert steps[-1]["type"] == "eval" and steps[-1]["eval_win_rate"] == result.eval_win_rate == 1.0
    assert result.objective == "dpo" and "win-rate 100%" in result.summary()
    assert (tmp_path / "run" / "reference_logps.json").is_file()


BAD_PAIRS = [
    ({"prompt": "Hi", "chosen": "Same answer.", "rejected": "Same answer."},
     "non_preferred_output: is the same as preferred_output"),
    ({"input": {"messages": [{"role": "user", "content": "Hi"}]},
      "preferred_output": [{"role": "assistant", "content": "  "}],
      "non_preferred_output": [{"role": "assistant", "content": "No."}]}, "preferred_output[0].content: is empty"),
    ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "user", "content": "Hello."}],
      "rejected": [{"role": "assistant", "content": "No."}]}, "preferred_output[0].role: must be 'assistant'"),
    ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [], "rejected": "No."},
     "preferred_output: must be a list of one assistant message, got 0 messages"),
    ({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes?"}], "chosen": "A.",
      "rejected": "B."}, "input.messages[1].role: ends with an assistant message"),
    ({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A."}],
      "rejected": [{"role": "user", "content": "Ho"}, {"role": "assistant", "content": "B."}]},
     "rejected: without `prompt`, `chosen` and `rejected` must be the same conversation"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A."}]},
     "is a chat example, where preference pairs are expected"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_PAIRS)
def test_a_bad_pair_is_one_error_naming_its_line_and_field(tiny_model_dir, tmp_path, bad, message):
    from tunesmith.data import prepare
    from tunesmith.errors import UserError

    raw = write_jsonl(tmp_path / "pairs.jsonl", [*preference_rows(3), bad, *preference_rows(2, seed=3)])
    cfg = {"model": {"name_or_path": str(tiny_model_dir)}, "train": {"objective": "dpo"},
           "data": {"eval_fraction": 0}}
    with pytest.raises(UserError) as info:
        prepare(cfg, [raw], out_dir=tmp_path / "prepared")
    assert f"pairs.jsonl:4: {message}" in info.value.message
    assert "pairs.jsonl:1" not in info.value.message  # only the bad line


def test_the_wrong_kind_of_data_for_the_objective_is_one_error_naming_the_file_and_line(tiny_model_dir, tmp_path):
    from tunesmith.cli import main

    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                               {"role": "assistant", "content": "Hello."}]}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(2))
    assert main(["train", str(dpo_config(tmp_path, tiny_model_dir, chat, max_steps=1))]) == 2
    from tunesmith.data import read_numbered
    from tunesmith.errors import UserError

    with pytest.raises(UserError, match=r"chat\.jsonl:1: is a chat example, where preference pairs are expected"):
        read_numbered(chat, preference=True)
    with pytest.raises(UserError, match=r"pairs\.jsonl:1: is a preference pair .* set train\.objective: dpo"):
        read_numbered(pairs)
    sft = dpo_config(tmp_path, tiny_model_dir, pairs, max_steps=1)
    sft.write_text(sft.read_text().replace("objective: dpo", "objective: sft"))
    assert main(["train", str(sft)]) == 2


def test_lora_dpo_runs_through_tunesmith_run_and_reports_the_win_rate(tiny_model_dir, tmp_path):
    """The pipeline: data prepare on pairs, LoRA DPO (reference: adapters off) scored on the held-out pairs, merge;
    the eval stages are skipped with the reason (the held-out split is preference pairs)."""
    from tunesmith.config import load_config
    from tunesmith.pipeline import run

    raw = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(24))
    path = dpo_config(tmp_path, tiny_model_dir, tmp_path / "unused", method="lora", max_steps=4,
                      learning_rate=5e-3, eval_strategy="steps", eval_steps=4)
    cfg = load_config(path, [f"data.train_files=[{raw}]", "data.eval_fraction=0.2"])
    result = run(cfg)
    stages = {s.name: s for s in result.stages}
    assert stages["train"].status == "ran" and stages["merge"].status == "ran"
    assert "win-rate" in stages["train"].summary
    assert stages["eval"].status == "not needed" and "preference tuning" in stages["eval"].summary
    train = json.loads((Path(stages["train"].outputs["run_dir"]) / "run.json").read_text())
    assert train["result"]["eval_win_rate"] is not None and train["result"]["objective"] == "dpo"


@pytest.mark.slow
def test_a_lora_dpo_job_on_smollm2_runs_through_tunesmith_train(tmp_path):
    """The real model (ChatML template, tied embeddings): a few LoRA DPO steps from the CLI; the adapter trained."""
    from safetensors.torch import load_file

    from tunesmith.cli import main
    from tunesmith.local_model import ensure_named_model

    data = tmp_path / "data"
    data.mkdir()
    rows = preference_rows(3)
    write_jsonl(data / "train.jsonl", rows[:2])
    write_jsonl(data / "eval.jsonl", rows[2:])
    cfg = dpo_config(tmp_path, ensure_named_model("smollm2-135m-instruct"), data, method="lora", max_steps=1,
                     per_device_train_batch_size=2, learning_rate=1e-3, eval_strategy="steps", eval_steps=1,
                     lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["result"]["objective"] == "dpo" and run["result"]["steps"] == 1
    assert 0.0 <= run["result"]["eval_win_rate"] <= 1.0
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)


def test_task_eval_samples_with_dpo_is_a_config_error_not_silently_ignored():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="task_eval_samples generates answers"):
        TrainConfig(objective="dpo", task_eval_samples=8)
    assert TrainConfig(objective="dpo").task_eval_samples == 0


def test_packed_pairs_stay_whole_within_the_row_budget_and_give_the_padded_loss(tiny_model_dir, tiny_tokenizer):
    """Packed rows hold whole pairs (both sequences in one row) and never more tokens than the memory plan's row
    budget; the loss, rewards and gradients are the padded layout's."""
    from transformers import AutoModelForCausalLM

    from tunesmith.train.batching import row_budget

    pairs = pairs_of(tiny_tokenizer, preference_rows(7, seed=3))
    longest = max(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)
    budget = row_budget(row_tokens=longest + 5, batch_size=4, max_length=64, packed=True, pairs=True)
    assert budget == max(longest + 5, 128)
    batches = list(preference.pair_batches(pairs, list(range(7)), 4, 64, 0, True, row_tokens=longest + 5))
    assert sorted(i for _, group in batches for i in group) == list(range(7))
    assert len(batches) > 2  # the budget splits the step into several rows, not micro_size pairs to a row
    for batch, group in batches:
        assert batch.num_tokens <= budget
        assert batch.cu_seq_lens.numel() - 1 == 2 * len(group)  # each pair's chosen and rejected sequence
    assert row_budget(row_tokens=None, batch_size=1, max_length=64, packed=True, pairs=True) == 128
    assert row_budget(row_tokens=None, batch_size=4, max_length=64, packed=False, pairs=True) == 512

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    dpo = TrainConfig(objective="dpo", dpo={"beta": 0.5}).dpo
    with torch.no_grad():  # move the policy away from the reference (the initial weights' log-probs)
        for p in model.parameters():
            p.add_(0.01 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).view_as(p))

    def step(packed: bool) -> tuple[float, dict, dict]:
        setup = StepSetup(procs=Processes.single(CPU), precision=Precision(torch.float32, None),
                          optimizer="adamw_torch", pad_id=0, packed=packed, fused_loss=True)
        reference = [replace_reference(p, 1.5 * k) for k, p in enumerate(pairs)]
        model.zero_grad(set_to_none=True)
        _, _, n, loss_sum, metrics = preference.accumulate(model, setup=setup, dpo=dpo, pairs=reference,
                                                           indices=list(range(7)), micro_size=4, max_length=64,
                                                           row_tokens=longest + 5)
        return loss_sum / n, metrics, {k: p.grad.clone() for k, p in model.named_parameters()}

    packed_loss, packed_metrics, packed_grads = step(True)
    padded_loss, padded_metrics, padded_grads = step(False)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert packed_metrics["rewards/margins"] == pytest.approx(padded_metrics["rewards/margins"], rel=1e-5)
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def replace_reference(pair: PreferencePair, shift: float) -> PreferencePair:
    """The pair with made-up reference log-probs (a different margin per pair), as precomputed for full tuning."""
    from dataclasses import replace

    return replace(pair, reference=(-10.0 - shift, -12.0 + shift))

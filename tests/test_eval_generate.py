"""Batched generation and answer loss on the tiny local model."""

from __future__ import annotations

import pytest

from tunesmith.chat import IGNORE_INDEX, end_of_turn_ids, prompt_ids, tokenize_chat
from tunesmith.evaluate.evalset import EvalExample
from tunesmith.evaluate.generate import encode_prompts, generate_transformers
from tunesmith.evaluate.loss import answer_loss

QUESTIONS = ["Hi", "What is the capital of France? Answer in one short sentence.",
             "SELECT name FROM customers", "How many orders did each customer place in 2024? Count them and sort.",
             "JSON please", "The quick brown fox"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # a random tiny model's logits are nearly flat; sharpen them so greedy picks are not near-ties that float noise
    # from a different batch shape could flip (the property under test is the padding, not rounding)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def examples() -> list[EvalExample]:
    return [EvalExample(i + 1, [{"role": "user", "content": q}], "x") for i, q in enumerate(QUESTIONS)]


def test_left_padded_batches_give_the_same_greedy_answers_as_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = encode_prompts(tokenizer, examples())
    assert len({len(p) for p in prompts}) > 3  # the batch really is padded
    alone = generate_transformers(model, tokenizer, prompts, max_new_tokens=12, batch_size=1)
    batched = generate_transformers(model, tokenizer, prompts, max_new_tokens=12, batch_size=len(prompts))
    assert batched == alone
    assert any(a for a in alone)  # the model did produce text


def _hand_greedy(model, tokenizer, ids, n):
    import torch

    stop = set(end_of_turn_ids(tokenizer))
    tokens = list(ids)
    with torch.no_grad():
        for _ in range(n):  # plain argmax decoding: no cache, no padding, no logits processors
            nxt = int(model(torch.tensor([tokens])).logits[0, -1].argmax())
            if nxt in stop:
                break
            tokens.append(nxt)
    return tokenizer.decode(tokens[len(ids):], skip_special_tokens=True).strip()


def test_generation_is_the_plain_greedy_continuation_of_the_training_prompt_tokens(tiny):
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer, examples()[1].messages)
    assert generate_transformers(model, tokenizer, [ids], max_new_tokens=10, batch_size=1) == [
        _hand_greedy(model, tokenizer, ids, 10)]


def test_a_checkpoint_generation_config_that_samples_and_penalises_repeats_does_not_leak_in(tiny):
    from transformers import GenerationConfig

    model, tokenizer = tiny
    ids = prompt_ids(tokenizer, examples()[3].messages)
    saved = model.generation_config
    model.generation_config = GenerationConfig(do_sample=True, temperature=1.5, top_k=0, repetition_penalty=5.0,
                                               no_repeat_ngram_size=1, max_new_tokens=2)
    try:
        answers = {generate_transformers(model, tokenizer, [ids], max_new_tokens=24, batch_size=1)[0]
                   for _ in range(3)}
        assert model.generation_config.repetition_penalty == 5.0  # the model's own config is put back
    finally:
        model.generation_config = saved
    assert answers == {_hand_greedy(model, tokenizer, ids, 24)}


def test_answer_loss_is_the_mean_over_supervised_answer_tokens_only(tiny):
    import torch
    import torch.nn.functional as F

    model, tokenizer = tiny
    exs = [EvalExample(1, [{"role": "user", "content": "Capital of France?"}], "Paris"),
           EvalExample(2, [{"role": "user", "content": "Say a long sentence please"}],
                       "The quick brown fox jumps over the lazy dog.")]
    batched = answer_loss(model, tokenizer, exs, batch_size=2)
    total, count = 0.0, 0
    for ex in exs:  # one at a time, no padding
        chat = tokenize_chat(tokenizer, ex.conversation())
        with torch.no_grad():
            logits = model(torch.tensor([chat.input_ids])).logits[0, :-1]
        labels = torch.tensor(chat.labels[1:])
        total += F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((labels != IGNORE_INDEX).sum())
    assert batched["supervised_tokens"] == count
    assert batched["loss"] == pytest.approx(total / count, rel=1e-5)
    assert 0.0 <= batched["token_accuracy"] <= 1.0

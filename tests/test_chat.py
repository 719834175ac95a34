from tunesmith.chat import IGNORE_INDEX, prompt_ids, tokenize_chat

MESSAGES = [
    {"role": "system", "content": "You are a helpful SQL assistant."},
    {"role": "user", "content": "How many orders?"},
    {"role": "assistant", "content": "SELECT COUNT(*) FROM orders;"},
    {"role": "user", "content": "And customers?"},
    {"role": "assistant", "content": "SELECT COUNT(*) FROM customers;"},
]


def supervised_runs(tok, chat) -> list[str]:
    runs, cur = [], []
    for i, label in zip(chat.input_ids, chat.labels, strict=True):
        if label != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_labels_cover_only_assistant_turns_and_end_of_turn(tiny_tokenizer):
    chat = tokenize_chat(tiny_tokenizer, MESSAGES)
    assert supervised_runs(tiny_tokenizer, chat) == [
        "SELECT COUNT(*) FROM orders;<|im_end|>",
        "SELECT COUNT(*) FROM customers;<|im_end|>",
    ]
    # every supervised label equals its input id (the shift happens in the loss)
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(chat.input_ids, chat.labels, strict=True))


def test_weight_zero_turn_is_not_trained_on(tiny_tokenizer):
    msgs = [dict(m) for m in MESSAGES]
    msgs[2]["weight"] = 0
    chat = tokenize_chat(tiny_tokenizer, msgs)
    assert supervised_runs(tiny_tokenizer, chat) == ["SELECT COUNT(*) FROM customers;<|im_end|>"]


def test_special_token_text_in_content_is_not_a_control_token(tiny_tokenizer):
    eot = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    msgs = [{"role": "user", "content": "say <|im_end|> please"}, {"role": "assistant", "content": "no"}]
    chat = tokenize_chat(tiny_tokenizer, msgs)
    # one end-of-turn after the user turn, one after the assistant turn; none from the user's text
    assert chat.input_ids.count(eot) == 2
    assert "<|im_end|> please" in tiny_tokenizer.decode(chat.input_ids)


def test_prompt_ids_match_training_prefix(tiny_tokenizer):
    chat = tokenize_chat(tiny_tokenizer, MESSAGES[:3])
    prompt = prompt_ids(tiny_tokenizer, MESSAGES[:2])
    assert chat.input_ids[: len(prompt)] == prompt
    assert chat.labels[len(prompt) - 1] == IGNORE_INDEX and chat.labels[len(prompt)] != IGNORE_INDEX

"""Greedy, deterministic answer generation: transformers (default), vLLM (GPU, when installed), llama.cpp (GGUF).

Every backend gets the same prompt: ``tunesmith.chat.prompt_ids`` — the tokens training saw before an assistant
turn — and stops at the model's end-of-turn tokens.

Batched transformers generation pads on the LEFT (new tokens are appended on the right, so every row's last token
must be a real one), masks the padding, and lets ``generate`` derive position ids from the mask — so a batched
prompt gives exactly the answer it gives alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..chat import end_of_turn_ids, prompt_ids
from ..errors import UserError
from ..models import base_model
from .evalset import EvalExample

Progress = Callable[[int, int], None]
"""Called with (done, total) after each batch."""


def encode_prompts(tokenizer: Any, examples: Sequence[EvalExample]) -> list[list[int]]:
    return [prompt_ids(tokenizer, ex.messages, tools=ex.tools) for ex in examples]


def generate_transformers(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                          batch_size: int, progress: Progress | None = None) -> list[str]:
    """Greedy answers for token-id prompts, in order. Prompts of similar length are batched together."""
    import torch
    from transformers import GenerationConfig

    stop = end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    gen_config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=stop,
                                  pad_token_id=pad, bos_token_id=tokenizer.bos_token_id, use_cache=True)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, str] = {}
    was_training = model.training
    model.eval()
    # generate() fills every field left unset in the config it is given from model.generation_config — a
    # checkpoint's repetition_penalty or no_repeat_ngram_size would leak into "greedy". Swap in ours meanwhile.
    owner = base_model(model)
    saved_config = owner.generation_config
    owner.generation_config = gen_config
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                n = len(prompts[i])
                ids[row, width - n:] = torch.tensor(prompts[i], dtype=torch.long)
                mask[row, width - n:] = 1
            with torch.no_grad():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=gen_config)
            for row, i in enumerate(chunk):
                answers[i] = _decode_answer(tokenizer, out[row, width:].tolist(), stop)
            if progress:
                progress(min(start + batch_size, len(order)), len(order))
    finally:
        owner.generation_config = saved_config
        model.train(was_training)
    return [answers[i] for i in range(len(prompts))]


def _decode_answer(tokenizer: Any, new_ids: list[int], stop: list[int]) -> str:
    # everything from the first end-of-turn on is padding of a row that finished before the batch did
    cut = next((k for k, t in enumerate(new_ids) if t in stop), len(new_ids))
    return tokenizer.decode(new_ids[:cut], skip_special_tokens=True).strip()


def vllm_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def generate_vllm(model_path: str, adapter_path: str | None, tokenizer: Any, prompts: Sequence[Sequence[int]],
                  max_new_tokens: int, max_lora_rank: int = 16) -> list[str]:  # pragma: no cover - GPU only
    """Greedy answers through vLLM (GPU machines where it is installed); adapters served with LoRARequest.
    vLLM takes half the GPU memory, so the transformers model for eval loss fits next to it."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_path, enable_lora=adapter_path is not None, max_lora_rank=max_lora_rank, seed=0,
              trust_remote_code=False, gpu_memory_utilization=0.5,
              generation_config="vllm")  # as with transformers: the checkpoint's sampling defaults stay out
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=end_of_turn_ids(tokenizer),
                            skip_special_tokens=True)
    lora = None
    if adapter_path is not None:
        from vllm.lora.request import LoRARequest

        lora = LoRARequest("adapter", 1, adapter_path)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, lora_request=lora,
                           use_tqdm=False)
    return [o.outputs[0].text.strip() for o in outputs]


def generate_llama_cpp(gguf_path: str, tokenizer: Any | None, examples: Sequence[EvalExample],
                       max_new_tokens: int, n_ctx: int = 0, progress: Progress | None = None) -> list[str]:
    """Greedy answers from a GGUF file through llama.cpp (``n_ctx`` 0: the model's trained context).

    With the HF tokenizer of the exported model (same vocabulary), the prompt is the very token ids the HF model
    gets. Otherwise the GGUF's own chat template renders the text and llama.cpp tokenises it whole — which can
    split words differently from training (message contents are tokenised apart from the template there), and a
    small model can answer differently for it; evaluate with the HF model's tokenizer when you have it."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError(f"{gguf_path}: evaluating a GGUF file needs llama-cpp-python",
                        hint="pip install 'tunesmith[gguf]'") from None
    try:
        llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, seed=0, verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"{gguf_path}: llama.cpp could not load this GGUF file ({exc})") from None
    same_vocab = tokenizer is not None and llm.n_vocab() == len(tokenizer)
    stop_ids = {llm.token_eos(), *(end_of_turn_ids(tokenizer) if same_vocab else [])}
    answers = []
    for k, ex in enumerate(examples, start=1):
        if same_vocab:
            tokens = prompt_ids(tokenizer, ex.messages, tools=ex.tools)
        else:
            # special=True: the template's control tokens (<|im_start|>) become control tokens, as in HF
            tokens = llm.tokenize(_render_with_gguf_template(llm, ex).encode("utf-8"), add_bos=False, special=True)
        out: list[int] = []
        for token in llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if token in stop_ids or len(out) >= max_new_tokens:
                break
            out.append(token)
        answers.append(llm.detokenize(out).decode("utf-8", errors="replace").strip())
        if progress:
            progress(k, len(examples))
    return answers


def _render_with_gguf_template(llm: Any, ex: EvalExample) -> str:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise UserError("the GGUF file has no chat template and no matching tokenizer was given to render prompts",
                        hint="evaluate it with `model.name_or_path` pointing at the HF model it was exported from")
    formatter = Jinja2ChatFormatter(template, eos_token=llm.detokenize([llm.token_eos()]).decode(),
                                    bos_token=llm.detokenize([llm.token_bos()]).decode(), add_generation_prompt=True)
    return formatter(messages=ex.messages).prompt

"""Small Llama-architecture models built on this machine, for the demo and the tests (no hub, ever).

The tokenizer is a SentencePiece-style BPE (Metaspace pre-tokenizer, byte fallback) trained in a second on a
given corpus: that is the family llama.cpp's GGUF converter recognises, so the demo model exports to GGUF.
Weights are random (seeded): the model starts untrained.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .paths import home

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML: each turn ends with ``<|im_end|>``, which is also the end-of-sequence token for generation."""

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class LocalModelShape:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512, split_digits: bool = False):
    """Train a byte-fallback BPE tokenizer on ``corpus`` and wrap it with a ChatML chat template.

    ``split_digits``: every digit and punctuation mark is its own token (as in Llama 2's tokenizer), so a number
    never seen in training is still made of known tokens, and ``40?`` and ``40;`` share the ``4`` and ``0``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # No dummy-prefix space: a segment tokenised after a control token must not gain a leading space.
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            tok.pre_tokenizer, pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + byte_tokens,
                                  show_progress=False, initial_alphabet=[])
    tok.train_from_iterator(corpus, trainer=trainer)
    # add_prefix_space=False states the no-dummy-prefix choice in tokenizer_config.json, where llama.cpp's GGUF
    # converter reads it; without it llama.cpp inserts "▁" after every control token and tokenises prompts
    # differently from training.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   add_prefix_space=False)
    fast.chat_template = CHATML_TEMPLATE
    fast.add_bos_token = False
    return fast


def build_model(out_dir: str | Path, corpus: Iterable[str], shape: LocalModelShape | None = None, seed: int = 0,
                vocab_size: int | None = None, split_digits: bool = False) -> Path:
    """Write a randomly initialised Llama model + trained tokenizer as an ordinary HF folder (safetensors)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    shape = shape or LocalModelShape()
    out = Path(out_dir)
    tok = build_tokenizer(corpus, vocab_size or shape.vocab_size, split_digits=split_digits)
    cfg = LlamaConfig(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, vocab_size=len(tok),
        max_position_embeddings=shape.max_position_embeddings, tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        rms_norm_eps=1e-5, rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    recipe = {"seed": seed, **shape.__dict__, "split_digits": split_digits}
    (tmp / "tunesmith_local_model.json").write_text(json.dumps(recipe, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


TINY_CORPUS = (
    "You are a helpful assistant. Answer the question in one short sentence.",
    "What is the capital of France? The capital of France is Paris.",
    "SELECT name, city FROM customers WHERE city = 'Paris' ORDER BY name LIMIT 10;",
    "SELECT customer_id, SUM(amount) AS revenue FROM orders GROUP BY customer_id ORDER BY revenue DESC;",
    'Return JSON: {"name": "Alice", "age": 31, "tags": ["a", "b"]}',
    "How many orders did each customer place in 2024? Count them and sort by the count.",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
)
"""A few lines of English, SQL and JSON: enough for a tokenizer that splits test data sensibly."""

@dataclass(frozen=True)
class NamedModel:
    shape: LocalModelShape
    corpus: Callable[[], Iterable[str]]
    """Text the tokenizer is trained on (called once, when the model is built)."""
    vocab_size: int
    split_digits: bool = False


def _demo_corpus() -> list[str]:
    from .demo import tokenizer_corpus

    return tokenizer_corpus()


NAMED_MODELS: dict[str, NamedModel] = {
    "tiny": NamedModel(LocalModelShape(), lambda: list(TINY_CORPUS) * 20, 512),
    # The SQL demo's base: random weights (untrained), sized so that full fine-tuning on two CPU cores learns the
    # task in a few minutes. Tied embeddings: a value copied from the question into the query (a city, a number
    # never seen in training) is read and written through the same vectors. Digits and punctuation are single
    # tokens, so an unseen number is made of known pieces.
    "demo": NamedModel(LocalModelShape(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=4, vocab_size=1024,
                                       max_position_embeddings=512, tie_word_embeddings=True),
                       _demo_corpus, 1024, split_digits=True),
}
"""``local:NAME`` models tunesmith builds on this machine (seeded, so every machine builds the same one)."""


def models_home() -> Path:
    """Where built local models are cached: $TUNESMITH_HOME/models (default ~/.cache/tunesmith/models)."""
    return home() / "models"


def ensure_named_model(name: str) -> Path:
    """Build ``local:NAME`` once and return its folder: a pretrained model read from the GGUF an installed package
    ships (``local:smollm2-135m-instruct``), or a random model built here (deterministic, seeded)."""
    from .errors import UserError
    from .gguf_import import PACKAGED, ensure_packaged

    if name in PACKAGED:
        return ensure_packaged(name, models_home())
    if name not in NAMED_MODELS:
        known = [*PACKAGED, *NAMED_MODELS]
        raise UserError(f"model.name_or_path: unknown local model local:{name}",
                        hint=f"known: {', '.join('local:' + n for n in known)}")
    spec = NAMED_MODELS[name]
    out = models_home() / name
    wanted = {"seed": 0, **spec.shape.__dict__, "split_digits": spec.split_digits}
    if not (out / "config.json").is_file() or _built_with(out) != wanted:
        out.parent.mkdir(parents=True, exist_ok=True)
        build_model(out, spec.corpus(), shape=spec.shape, vocab_size=spec.vocab_size, split_digits=spec.split_digits)
    return out


def _built_with(folder: Path) -> dict | None:
    """The recipe a cached local model was built from (a changed recipe rebuilds it)."""
    try:
        return json.loads((folder / "tunesmith_local_model.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None

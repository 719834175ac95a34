"""The guide's decision framework, as rules. Each branch returns the recommendation and the guide's reasoning for it.

Order of the questions (the guide's, plus the constraints it implies):

1. fewer than 1,000 examples                → don't fine-tune yet: prompt engineering / few-shot, come back later
2. none of format, latency, cost, privacy, quality (nor a domain shift) → don't fine-tune yet: prompts and RAG
3. operational simplicity, data may leave   → OpenAI fine-tuning API (gpt-4o-mini)
   (privacy forbids it: the data can't leave → fall through to self-hosted fine-tuning, and say so)
4. maximum quality with budget              → full fine-tuning on a 70B+ model
5. > 100,000 examples and a domain shift    → full fine-tuning
6. latency                                  → QLoRA on a ~7B model, serve with vLLM
7. cost at scale                            → QLoRA on 7B or 13B, self-host on A10G or H100
8. format / style, or privacy               → LoRA (the guide's recommended preset)

Then memory decides: a method that does not fit on the GPUs falls back (full → LoRA → QLoRA), with the numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

DRIVERS = ("format", "latency", "cost", "privacy", "quality", "simplicity")
"""The guide's reasons (format/style hard to prompt for, latency, cost at scale, data privacy) plus the two questions of
its decision framework (maximum quality with budget, operational simplicity)."""

MIN_EXAMPLES = 1_000
FULL_FT_EXAMPLES = 100_000
COST_AT_SCALE_CALLS_PER_DAY = 10_000_000

DEFAULT_MODELS = {"small": "llama-3.1-8b", "large": "llama-3.1-70b"}
"""Catalogue models the advisor picks when the user names none: ~7–8B for latency/cost/format, 70B+ for quality."""

SERVE = {
    "vllm": "vLLM: merge the adapter (`tunesmith merge`) and serve the merged model with vLLM (continuous batching, "
            "paged KV cache; AWQ 4-bit halves the memory again)",
    "vllm_tp": "vLLM with tensor parallelism across the GPUs (a 70B model is ~140 GB in bf16, ~40 GB in AWQ 4-bit)",
    "self_host": "self-host with vLLM: an A10G (24 GB) holds a 7–8B model in bf16 or AWQ 4-bit at low cost per "
                 "hour; H100s for the highest volume",
    "local": "on your own machines: vLLM on your GPUs, or llama.cpp / Ollama with a GGUF (q4_k_m) on CPUs, laptops "
             "and edge boxes (`tunesmith export gguf`)",
    "openai": "OpenAI: upload the JSONL, fine-tune gpt-4o-mini with the fine-tuning API and call the resulting "
              "model id — no GPUs, no serving stack",
    "none": "keep using the prompted model you have (or an API model) while you collect data",
}


@dataclass(frozen=True)
class Decision:
    verdict: str
    """``not_yet``, ``fine_tune`` or ``openai_fine_tuning``."""
    rule: str
    """Which branch decided: too_few_examples, no_driver, simplicity, quality, domain_shift, latency, cost,
    format_or_privacy."""
    method: str | None
    """``full``, ``lora`` or ``qlora`` (None unless fine-tuning here)."""
    model_size: str
    """The size the guide recommends for this branch (``~7B``, ``7B–13B``, ``70B+``, ``as given``)."""
    default_model: str | None
    """Catalogue model to use when the user named none."""
    serve: str
    reasons: tuple[str, ...]
    """The guide's reasoning, spelled out: each line is one reason, in order."""
    instead: tuple[str, ...] = ()
    """What to do instead (for ``not_yet``)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(examples: int | None, drivers: Iterable[str], *, domain_shift: bool = False,
           calls_per_day: int | None = None) -> Decision:
    """The guide's framework. ``examples`` None means no dataset was given (the count question is skipped)."""
    wanted = set(drivers)
    notes: list[str] = []
    if calls_per_day is not None and calls_per_day >= COST_AT_SCALE_CALLS_PER_DAY and "cost" not in wanted:
        wanted.add("cost")
        notes.append(f"At {calls_per_day:,} calls/day cost at scale applies: the guide's threshold is 10M+ calls/day.")

    if examples is not None and examples < MIN_EXAMPLES:
        return Decision(
            "not_yet", "too_few_examples", None, "as given", None, SERVE["none"],
            (f"You have {examples:,} examples; the guide's first question is 'Do you have < 1000 examples?' — "
             "then 'start with prompt engineering or few-shot. Come back when you have more data.'",
             "Quality beats quantity: 1,000 high-quality examples will outperform 100,000 noisy ones — so collect "
             "and clean examples before you train.", *notes),
            ("prompt engineering: a precise system prompt with the output format spelled out",
             "few-shot: put 3–10 of your best examples in the prompt",
             "RAG, if the model lacks knowledge rather than behaviour",
             f"collect at least {MIN_EXAMPLES:,} good examples (log the prompted model's accepted outputs), then "
             "run `tunesmith advise` again"))

    reasons_to_tune = wanted & {"format", "latency", "cost", "privacy", "quality"}
    if not reasons_to_tune and not domain_shift:
        return Decision(
            "not_yet", "no_driver", None, "as given", None, SERVE["none"],
            ("None of the reasons to fine-tune applies: format/style that is hard to prompt for, a latency "
             "constraint, cost at scale (10M+ calls/day), or data that can't leave your infrastructure.",
             "Prompt engineering and RAG are cheaper, faster to iterate, and easier to maintain; the guide: 'If none "
             "of these apply, don't fine-tune yet.'",
             *(["Operational simplicity on its own is a reason to stay with an API, not to train."]
               if "simplicity" in wanted else []), *notes),
            ("improve the prompt (instructions, output format, a few examples)",
             "RAG for knowledge the model lacks",
             "come back with `--driver` if one of the reasons appears (e.g. the prompt gets too long for your "
             "latency budget, or your call volume grows)"))

    if "simplicity" in wanted and "privacy" not in wanted:
        return Decision(
            "openai_fine_tuning", "simplicity", None, "gpt-4o-mini", None, SERVE["openai"],
            ("Operational simplicity is paramount: the guide's answer is the OpenAI fine-tuning API — "
             "'gpt-4o-mini is cost-effective'.",
             "No GPUs to rent, no training stack, no inference server to run; the trade-off is per-token pricing and "
             "your data leaving your infrastructure.", *notes))
    if "simplicity" in wanted:
        notes.append("You asked for simplicity, but the data can't leave your infrastructure, which rules out the "
                     "OpenAI fine-tuning API: the recommendation is self-hosted.")

    if "quality" in wanted:
        return Decision(
            "fine_tune", "quality", "full", "70B+", DEFAULT_MODELS["large"], SERVE["vllm_tp"],
            ("Maximum quality with budget: the guide's answer is full fine-tuning on a 70B+ model.",
             "Full fine-tuning trains every weight — maximum expressiveness, maximum cost; it needs several GPUs "
             "with sharded states (FSDP) at this size.", *notes))
    if domain_shift and examples is not None and examples > FULL_FT_EXAMPLES:
        return Decision(
            "fine_tune", "domain_shift", "full", "as given", DEFAULT_MODELS["small"],
            SERVE["local"] if "privacy" in wanted else SERVE["vllm"],
            (f"A dramatic domain shift with {examples:,} examples (more than 100K high-quality examples): the guide's "
             "case for full fine-tuning, which can move every weight towards the new domain.", *notes))
    if "latency" in wanted:
        return Decision(
            "fine_tune", "latency", "qlora", "~7B", DEFAULT_MODELS["small"], SERVE["vllm"],
            ("Latency is the constraint: the guide's answer is QLoRA on a 7B model, served with vLLM.",
             "The behaviour moves into the weights, so the long few-shot prompt goes away (fewer tokens to prefill "
             "on every call), and a ~7B model decodes many times faster than a 70B one.",
             "QLoRA trains it on a single GPU: the 4-bit NF4 base cuts memory about 4× against LoRA on bf16.", *notes))
    if "cost" in wanted:
        return Decision(
            "fine_tune", "cost", "qlora", "7B–13B", DEFAULT_MODELS["small"], SERVE["self_host"],
            ("Cost at scale: the guide's answer is QLoRA on 7B or 13B, self-hosted on A10G or H100 — 'at 10M+ "
             "calls/day, a smaller fine-tuned model can be 10–50× cheaper than GPT-4o' (computed for your volume "
             "below).", *notes))
    why = []
    if "format" in wanted:
        why.append("Format/style that is hard to prompt for (a JSON schema, a brand voice) is what fine-tuning "
                   "teaches best: the model learns it from examples instead of instructions.")
    if "privacy" in wanted:
        why.append("Data privacy: the training data can't leave your infrastructure, so training and serving run on "
                   "your own GPUs.")
    return Decision(
        "fine_tune", "format_or_privacy", "lora", "as given", DEFAULT_MODELS["small"],
        SERVE["local"] if "privacy" in wanted else SERVE["vllm"],
        (*why, "LoRA: freeze the base and train small adapters (a few percent of its parameters) instead of "
         "all of its weights, with the guide's recommended preset (r=16, α=32, lr 2e-4).", *notes))


def choose_method(preferred: str, fits: Mapping[str, bool], needs_gib: Mapping[str, float],
                  has_gib: float) -> tuple[str | None, tuple[str, ...]]:
    """The preferred method if it fits on the GPUs, else the next lighter one (full → LoRA → QLoRA), with why."""
    order = ["full", "lora", "qlora"]
    notes = []
    for method in order[order.index(preferred):]:
        if fits.get(method, False):
            return method, tuple(notes)
        notes.append(f"{method} needs ~{needs_gib[method]:.1f} GiB per GPU at micro-batch 1 with checkpointing: "
                     f"the GPUs have {has_gib:.1f} GiB each — it does not fit.")
    return None, tuple(notes)

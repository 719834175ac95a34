"""``train:`` — full fine-tuning, LoRA and QLoRA from one section; defaults are the guide's SFT recipe."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import Section

GUIDE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The guide's LoRA targets: all seven linear projections of a Llama-style block."""

# The guide's "LoRA hyperparameter guide". A preset fills only the fields the user did not set.
PRESETS: dict[str, dict[str, Any]] = {
    "conservative": {"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "learning_rate": 1e-4},
    "recommended": {"lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                    "learning_rate": 2e-4},
    "aggressive": {"lora": {"r": 64, "alpha": 128, "target_modules": list(GUIDE_TARGETS)}, "learning_rate": 3e-4},
}


class LoraSection(Section):
    r: int = Field(16, ge=1, le=4096)
    """LoRA rank: higher = more capacity and more trainable parameters."""

    alpha: float = Field(32, gt=0)
    """LoRA scaling numerator (the update is scaled by alpha / r; the guide uses 2 × r)."""

    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input. LoRA on one CUDA GPU: each adapter draws it inside its first product (no mask
    stored), with p rounded to a multiple of 2⁻¹⁶. QLoRA and several GPUs: PEFT's dropout."""

    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train (PEFT's ``bias``)."""

    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: list(GUIDE_TARGETS))
    """Module names to adapt, or ``all-linear`` (every linear layer but the output head)."""

    use_rslora: bool = False
    """Rank-stabilised scaling (alpha / sqrt(r)); useful at high rank."""


class QuantSection(Section):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type for the frozen base (QLoRA uses NF4)."""

    double_quant: bool = True
    """Quantize the quantization constants too (~0.4 bit/param saved)."""

    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Matmul dtype for the 4-bit layers. ``auto``: bf16 where the hardware has it, else fp32."""


class DpoSection(Section):
    beta: float = Field(0.1, gt=0)
    """How far the tuned model may move from the reference (the model before tuning): the reward of an answer is
    beta × (its log-probability under the model − under the reference). Lower lets it move further."""

    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """``sigmoid``: the DPO paper's loss, −log σ(beta × the reward margin of the preferred answer). ``ipo``: the
    IPO loss, (margin − 1 / (2 × beta))², on log-probabilities averaged per answer token; it stops pushing once
    the margin reaches its target, so it over-fits small preference sets less."""


class TrainConfig(Section):
    objective: Literal["sft", "dpo"] = "sft"
    """What the model learns from: ``sft`` imitates the assistant turns of chat examples; ``dpo`` (direct
    preference optimisation) learns from pairs of answers to the same prompt, raising the preferred one over the
    other (data: preference pairs, see ``dpo``)."""

    dpo: DpoSection = DpoSection()
    """Preference tuning settings (``objective: dpo`` only)."""

    method: Literal["full", "lora", "qlora"] = "lora"
    """What to train: every weight (``full``), low-rank adapters on a frozen base (``lora``), or adapters on a
    4-bit NF4 base (``qlora``)."""

    preset: Literal["conservative", "recommended", "aggressive"] | None = None
    """The guide's LoRA table: sets r, alpha, targets and learning rate unless those are given explicitly."""

    dataset: str | None = None
    """A prepared folder (``tunesmith data prepare``: its train.jsonl / eval.jsonl) or one chat JSONL file.
    ``tunesmith run`` fills this from the data stage."""

    lora: LoraSection = LoraSection()
    """Adapter settings (``lora`` and ``qlora``)."""

    quant: QuantSection = QuantSection()
    """4-bit base settings (``qlora`` only)."""

    num_train_epochs: float = Field(3, gt=0)
    """Passes over the training split."""

    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (overrides epochs)."""

    per_device_train_batch_size: int = Field(4, ge=1)
    """Sequences per micro-batch (without packing), or the packed token budget's multiplier
    (with packing: per_device_train_batch_size × max_length tokens per micro-batch). With ``objective: dpo``:
    preference pairs per micro-batch (two sequences each)."""

    packed_row_tokens: int | None = Field(None, ge=8)
    """With packing: tokens per packed row, at least ``max_length``; None: per_device_train_batch_size ×
    max_length. For a row size between those multiples: fewer, longer rows per step cost less per token, for a
    little more memory. The step's sequences are unchanged."""

    gradient_accumulation_steps: int = Field(4, ge=1)
    """Micro-batches per optimizer step. The guide's 4 × 4 = 16 sequences per step."""

    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate."""

    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Decay after warm-up."""

    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Fraction of all optimizer steps spent warming up linearly from 0 (the guide's 3%)."""

    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""

    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this; None disables clipping."""

    optim: Literal["auto", "adamw_torch", "adamw_8bit", "adamw_8bit_bf16"] = "auto"
    """Optimizer. ``auto``: fp32 AdamW on fp32 master weights, except full fine-tuning on one GPU where its states
    do not fit — then ``adamw_8bit_bf16`` on a bf16 GPU with torchao installed and precision auto or bf16, else
    ``adamw_8bit``; chosen from the memory model and reported in run.json. ``adamw_8bit``: 8-bit states
    (bitsandbytes) with fp32 update maths on fp32 master weights (10 bytes per parameter with the gradients).
    ``adamw_8bit_bf16``: 8-bit states (torchao)
    with fp32 update maths on bf16 weights rounded stochastically, so an update below bf16's resolution still moves
    the weight in expectation instead of being lost (6 bytes per parameter; gradients accumulate in bf16 across the
    step's micro-batches); CUDA with bf16 only. Both 8-bit choices run on one GPU only."""

    max_length: int = Field(2048, ge=8)
    """Longest tokenised example, in tokens."""

    overlong: Literal["drop", "truncate", "error"] = "drop"
    """What to do with examples longer than max_length. Truncating can cut an answer before its end-of-turn
    token (the model then learns not to stop), so the default drops them — and counts them in run.json."""

    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute precision. ``auto``: bf16 autocast where the hardware has it, else fp32."""

    gradient_checkpointing: Literal["auto"] | bool = "auto"
    """Recompute activations in backward to save memory. ``auto`` on a GPU: as few decoder layers as the memory model
    says must be checkpointed to fit ``memory_limit_gb`` (none if everything fits; each layer not checkpointed
    saves its forward recomputation); every layer for qlora unless a limit is set; off on the CPU."""

    sharding: Literal["auto", "shard", "replicate"] = "auto"
    """How several GPUs (FSDP2) hold the model: ``shard`` splits weights, gradients and optimizer states across them
    (needed when a run does not fit one GPU: full fine-tuning, 70B LoRA); ``replicate`` keeps the whole model on
    each GPU and only averages gradients (no weight transfers: faster when it fits). ``auto``: replicate if the
    memory model says the run fits one GPU, else shard. One GPU: ignored."""

    memory_limit_gb: float | None = Field(None, gt=0)
    """GPU memory (GB per GPU) the ``auto`` choices may plan for; None: what is free on the GPU when training
    starts. Set it to share a GPU or to keep a run within a smaller card's memory."""

    embeddings_on_cpu: Literal["auto"] | bool = "auto"
    """LoRA/QLoRA on one GPU: keep the frozen input-embedding matrix in CPU memory and look tokens up there, sending
    only the looked-up rows to the GPU (frees vocabulary × hidden size × 2 bytes: 1 GiB for Llama-3's 128K × 4096).
    ``auto``: only when the step would not fit ``memory_limit_gb`` otherwise; never with tied input/output
    embeddings, full fine-tuning or several GPUs. Reported in run.json's plan."""

    offload_checkpoints: Literal["auto"] | bool = "auto"
    """One GPU: the inputs of checkpointed decoder layers (the one tensor each keeps for backward: tokens × hidden
    × 2 bytes, 2 GiB for an 8B model's 32 layers at 8K tokens) wait for backward in pinned CPU memory, copied out
    and back on side streams while the GPU computes. ``auto``: when layers must
    be checkpointed to fit ``memory_limit_gb`` and the freed memory lets fewer be checkpointed or the step fit.
    Reported in run.json's plan."""

    offload_layers: Literal["auto"] | int = "auto"
    """One GPU, layers that must not stay in GPU memory: this many of them are not recomputed in backward but
    offloaded whole — everything they save for backward waits in pinned CPU memory, copied out while forward goes
    on and back while backward works on the layers after them. It spends the
    GPU↔CPU link instead of a forward's FLOPs, so only as many pay as the link can move while forward runs.
    ``auto``: LoRA with compiled layers whose checkpointed inputs are offloaded: that many, from the link's speed
    (measured at the start of the run) and the GPU's datasheet peak. A number:
    exactly that many (at most the layers the plan checkpoints). 0: none. Reported in run.json's plan."""

    packing: Literal["auto"] | bool = "auto"
    """Padding-free packing: concatenate examples into one row with per-example position ids, so no token
    attends across examples and no compute is spent on padding. ``auto``: on for CUDA, off on the CPU."""

    base_precision: Literal["auto", "fp8"] = "auto"
    """LoRA: the precision of the frozen base's matrix products. ``auto``: the run's precision (bf16 on GPUs that
    have it). ``fp8``: every linear layer of the decoder blocks is stored in FP8 (e4m3, one scale per output
    channel: 1 byte per weight instead of 2) and its forward and input-gradient products run on FP8 tensor cores,
    each operand scaled per row; the adapters, their gradients and the optimizer stay as they are. Needs one CUDA
    GPU with FP8 tensor cores (compute capability 8.9+: L4, L40S, RTX 4090, H100, H200) and bf16 precision. The
    adapter is trained against the FP8-rounded base; a merge puts it into the original bf16 base and says how far
    that moves the logits."""

    matmul_precision: Literal["auto", "fp8"] = "auto"
    """Full fine-tuning: the precision of the decoder blocks' matrix products. ``auto``: the run's precision.
    ``fp8``: each linear layer of the decoder blocks casts its input, weight and output gradient to FP8 (e4m3, one
    scale per row) for its three products — forward, input gradient, weight gradient — on FP8 tensor cores, with
    fp32 accumulation and bf16 results; the weights, their gradients and the optimizer stay as ``optim`` has them
    (FP8 copies live for one product only), and the output head stays in bf16. Needs one CUDA GPU with FP8 tensor
    cores (compute capability 8.9+: L4, L40S, RTX 4090, H100, H200), bf16 precision and torchao. (LoRA's frozen base
    in FP8 is ``base_precision``.)"""

    compile: Literal["auto"] | bool = "auto"
    """Compile each decoder layer with torch.compile (fuses norms, RoPE, SwiGLU and the adapters' small ops; the
    first steps wait ~1 minute for compilation). ``auto``: on for CUDA GPUs, where it is faster for every method,
    off on the CPU."""

    logging_steps: int = Field(10, ge=1)
    """Log loss, learning rate and throughput every N optimizer steps."""

    save_strategy: Literal["epoch", "steps", "no"] = "epoch"
    """When to write a resumable checkpoint (a final model is always saved)."""

    save_steps: int = Field(500, ge=1)
    """Checkpoint every N optimizer steps when save_strategy is ``steps``."""

    save_total_limit: int | None = Field(2, ge=1)
    """Keep only the newest N checkpoints."""

    eval_strategy: Literal["epoch", "steps", "no"] = "epoch"
    """When to compute loss and token accuracy on the eval split (if there is one)."""

    eval_steps: int = Field(100, ge=1)
    """Evaluate every N optimizer steps when eval_strategy is ``steps``."""

    task_eval_samples: int = Field(0, ge=0)
    """At each evaluation, also generate answers for this many eval examples and score them with ``eval.metrics``
    (logged as ``task_<metric>``). 0: off (generation is slow; loss and token accuracy are always logged)."""

    on_oom: Literal["fail", "shrink"] = "fail"
    """Out of GPU memory: stop with advice (``fail``), or retry the step with half-size micro-batches (``shrink``)
    — the step keeps the same sequences, so the optimisation is unchanged."""

    seed: int = 42
    """Seeds weights of new adapters, data order and dropout."""

    deterministic: bool = False
    """Use deterministic kernels, so a resumed run reproduces the uninterrupted one bit for bit (CPU)."""

    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    """Experiment trackers that receive the losses, learning rate, gradient norm, tokens/s, memory, eval metrics
    and the config: ``tensorboard`` (event files in the run folder's tensorboard/), ``mlflow``
    (``MLFLOW_TRACKING_URI``, else mlflow.db in the run folder) and ``wandb`` (``WANDB_MODE=offline`` needs no
    network). Empty: nothing but the run folder's metrics.jsonl."""

    metric_for_best_model: str = "eval_loss"
    """The eval metric that picks the best step: ``eval_loss``, ``eval_perplexity``, ``eval_token_accuracy`` or a
    task metric ``task_<name>`` (with ``task_eval_samples`` > 0). run.json records the best step."""

    greater_is_better: bool | None = None
    """Whether a higher ``metric_for_best_model`` is better. None: lower for eval loss and perplexity, higher for
    token accuracy and task metrics."""

    load_best_model_at_end: bool = False
    """Keep the best step's weights as the run's adapter/model instead of the last step's. Each new best is
    checkpointed (whatever ``save_strategy`` says) and never pruned by ``save_total_limit``."""

    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many evaluations in a row without improving ``metric_for_best_model``. None: never."""

    early_stopping_threshold: float = Field(0.0, ge=0)
    """How much better than the best so far (in the metric's units) an evaluation must be to count as an
    improvement."""

    on_config_change: Literal["refuse", "warn"] = "refuse"
    """On ``--resume``, what to do if the config or data differ from the checkpoint's."""

    @field_validator("save_strategy", "eval_strategy", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` as false
        return "no" if value is False else value

    @field_validator("gradient_checkpointing", "packing", "compile", "embeddings_on_cpu", "offload_checkpoints",
                     mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        return {"on": True, "off": False}.get(value, value) if isinstance(value, str) else value

    @field_validator("offload_layers", mode="before")
    @classmethod
    def _layer_count(cls, value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, int) and value < 0):
            raise ValueError("must be auto or a number of layers (0 or more)")
        return value

    @model_validator(mode="after")
    def _row_holds_a_sequence(self) -> TrainConfig:
        if self.packed_row_tokens is not None and self.packed_row_tokens < self.max_length:
            raise ValueError(f"packed_row_tokens ({self.packed_row_tokens}) must be at least max_length "
                             f"({self.max_length}): a row holds at least one whole sequence")
        if (self.load_best_model_at_end or self.early_stopping_patience) and self.eval_strategy == "no":
            raise ValueError("load_best_model_at_end and early_stopping_patience need evaluations: set "
                             "eval_strategy to epoch or steps")
        if self.objective == "dpo" and self.task_eval_samples:
            raise ValueError("task_eval_samples generates answers for the task metrics of chat examples; a DPO run "
                             "evaluates its held-out pairs (eval loss and win-rate): set task_eval_samples to 0, "
                             "and score generations with `tunesmith eval` on a chat eval set")
        if self.base_precision == "fp8" and self.method != "lora":
            raise ValueError(f"base_precision fp8 is for method lora (a frozen bf16 base); {self.method} "
                             + ("trains every weight: use base_precision auto, and matmul_precision fp8 for FP8 "
                                "products" if self.method == "full" else
                                "already stores its base in 4 bits: use base_precision auto, or method lora for "
                                "an FP8 base"))
        if self.matmul_precision == "fp8" and self.method != "full":
            raise ValueError(f"matmul_precision fp8 is for method full (every weight trained, its products in FP8); "
                             f"{self.method} keeps a frozen base: use matmul_precision auto"
                             + (", and base_precision fp8 for an FP8 base" if self.method == "lora" else ""))
        if self.optim == "adamw_8bit_bf16" and self.method != "full":
            raise ValueError(f"optim adamw_8bit_bf16 trains bf16 weights (full fine-tuning); {self.method}'s "
                             "adapters are fp32: use optim auto or adamw_torch")
        return self

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("preset"):
            return data
        preset = PRESETS.get(data["preset"])
        if preset is None:  # let the Literal check produce the message
            return data
        out = dict(data)
        out.setdefault("learning_rate", preset["learning_rate"])
        lora = dict(out.get("lora") or {})
        for key, value in preset["lora"].items():
            lora.setdefault(key, value)
        out["lora"] = lora
        return out

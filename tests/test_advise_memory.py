"""The advisor's counts and memory model, checked against real models' tensors (tiny, on the CPU) and the published
parameter totals of the catalogue."""

from __future__ import annotations

import pytest
import torch

from advise_fixtures import PeakLiveBytes, catalogue_config
from tunesmith.hardware import catalog
from tunesmith.hardware.memory import (
    GIB,
    architecture_from_config,
    estimate_memory,
    largest_micro_batch,
    layer_activation_bytes_per_token,
    lora_trainable_params,
)

GUIDE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_config(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=256):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
                       max_position_embeddings=1024)


@pytest.mark.parametrize("name", list(catalog.MODELS))
def test_catalogue_configs_rebuild_the_published_parameter_counts(name):
    arch = architecture_from_config(catalogue_config(name), name)
    assert arch.total_params == catalog.MODELS[name]["params"]


def test_llama_3_1_8b_lora_r16_on_all_seven_projections_matches_the_seeds_printout():
    config = catalogue_config("llama-3.1-8b")
    arch = architecture_from_config(config)
    trainable, adapted_in = lora_trainable_params(config, 16, GUIDE_TARGETS)
    # the seed: "trainable params: 41,943,040 || all params: 8,072,204,288" (all = base + adapters)
    assert trainable == 41_943_040
    assert arch.total_params + trainable == 8_072_204_288
    assert arch.matmul_params == 7_504_924_672  # performance.md's N' = 7.505 B
    assert adapted_in == 5 * 4096 + 4096 + 14336  # q, k, v, gate, up read d; o reads q_dim; down reads i


def test_architectures_with_fused_projections_are_targeted_with_their_own_module_names():
    arch = architecture_from_config(catalogue_config("phi-3-mini"))
    assert "qkv_proj" in arch.linear_targets and "q_proj" not in arch.linear_targets


def test_weight_gradient_and_optimizer_bytes_equal_a_real_lora_models_tensors():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = tiny_config()
    arch = architecture_from_config(config)
    trainable, adapted_in = lora_trainable_params(config, 8, GUIDE_TARGETS)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=GUIDE_TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model(input_ids=torch.randint(0, 256, (2, 16)), labels=torch.randint(0, 256, (2, 16))).loss.backward()
    optimizer.step()

    est = estimate_memory(arch, "lora", 1, 16, lora_r=8, lora_trainable=trainable, adapted_in_features=adapted_in)
    assert sum(p.numel() for p in params) == trainable
    assert est.weights_gib == pytest.approx(base_bytes / GIB, abs=1e-3)
    assert all(p.dtype == torch.float32 for p in params)  # PEFT upcasts adapters: 4 bytes each
    assert est.gradients_gib * GIB == pytest.approx(sum(p.grad.numel() * p.grad.element_size() for p in params),
                                                    rel=1e-3, abs=GIB * 1e-3)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert est.optimizer_gib * GIB == pytest.approx(state, rel=1e-3, abs=GIB * 1e-3)


def test_full_fine_tuning_with_fp32_master_weights_costs_16_bytes_per_parameter_before_activations():
    from transformers import AutoModelForCausalLM

    config = tiny_config()
    arch = architecture_from_config(config)
    model = AutoModelForCausalLM.from_config(config)  # fp32 master weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.randint(0, 256, (1, 8)), labels=torch.randint(0, 256, (1, 8))).loss.backward()
    optimizer.step()
    real = (sum(p.numel() * p.element_size() * 2 for p in model.parameters())  # weights + gradients
            + sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step"))
    est = estimate_memory(arch, "full", 1, 8, full_precision="mixed")
    assert (est.weights_gib + est.gradients_gib + est.optimizer_gib) * GIB == pytest.approx(real, rel=1e-3)
    assert real == 16 * arch.total_params


def test_nf4_weight_bytes_match_a_real_bitsandbytes_model():
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = tiny_config(hidden=128, intermediate=256, head_dim=32)
    arch = architecture_from_config(config)
    torch.manual_seed(0)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.bfloat16)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16)
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            real += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                real += state.state2.absmax.numel() * state.state2.absmax.element_size()
    est = estimate_memory(arch, "qlora", 1, 8)
    assert est.weights_gib * GIB == pytest.approx(real, rel=0.01)


def _saved_bytes_per_token_per_layer(config, method, dropout, tokens=(4, 128)):
    """Bytes autograd keeps for backward, per token, for one decoder layer: two depths, same batch, difference."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def saved(layers):
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
        if method == "lora":
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                     target_modules=GUIDE_TARGETS))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        model.train()
        seen = {}

        def pack(t):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
            return t

        ids = torch.randint(0, config.vocab_size, tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, use_cache=False)
        return sum(n for ptr, n in seen.items() if ptr not in params)

    return (saved(3) - saved(2)) / (tokens[0] * tokens[1])


@pytest.mark.parametrize("shape", [dict(), dict(hidden=128, intermediate=384, heads=8, kv_heads=2, head_dim=16)])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_saved_activations_per_layer_match_the_formula_on_a_real_forward(method, shape):
    config = tiny_config(**shape)
    arch = architecture_from_config(config)
    _, adapted_in = lora_trainable_params(config, 8, GUIDE_TARGETS)
    measured = _saved_bytes_per_token_per_layer(config, method, dropout=0.05)
    # on the CPU, dropout keeps an fp32 noise tensor (4 bytes) where CUDA's fused dropout keeps a 1-byte mask
    formula = layer_activation_bytes_per_token(arch, method, 8, adapted_in, 0.05, dropout_mask_bytes=4)
    assert formula == pytest.approx(measured, rel=0.03)


def test_activations_grow_linearly_with_tokens_and_checkpointing_keeps_only_layer_inputs():
    arch = architecture_from_config(catalogue_config("llama-3.1-8b"))
    one = estimate_memory(arch, "lora", 1, 2048, lora_trainable=41_943_040, checkpointing="none")
    two = estimate_memory(arch, "lora", 2, 2048, lora_trainable=41_943_040, checkpointing="none")
    assert two.activations_gib == pytest.approx(2 * one.activations_gib, rel=1e-3)
    assert two.weights_gib == one.weights_gib
    ckpt = estimate_memory(arch, "lora", 2, 2048, lora_trainable=41_943_040, checkpointing="full")
    # checkpointing keeps one bf16 hidden state per layer (+ embedding/final norm), not every layer's activations
    assert ckpt.activations_gib == pytest.approx((32 * 2 + 6) * 4096 * 4096 / GIB, rel=1e-3)
    assert ckpt.activations_gib < two.activations_gib / 10 and ckpt.peak_allocated_gib < two.peak_allocated_gib


def test_full_logits_of_a_128k_vocabulary_dominate_and_chunking_removes_them():
    arch = architecture_from_config(catalogue_config("llama-3.1-8b"))
    full = estimate_memory(arch, "lora", 4, 2048, lora_trainable=41_943_040, logits="full")
    fused = estimate_memory(arch, "lora", 4, 2048, lora_trainable=41_943_040, logits="fused")
    # 8,192 tokens × 128,256 vocab × 12 bytes (bf16 logits, fp32 log-softmax, its fp32 gradient, bf16 cast)
    assert full.head_and_transients_gib == pytest.approx(8192 * 128256 * 12 / GIB, rel=1e-3)
    assert full.peak_allocated_gib - fused.peak_allocated_gib > 9


def test_largest_micro_batch_is_the_last_one_that_fits():
    arch = architecture_from_config(catalogue_config("llama-3.1-8b"))
    kwargs = {"lora_trainable": 41_943_040}
    best = largest_micro_batch(arch, "qlora", 2048, 22.5, **kwargs)
    assert best >= 1
    assert estimate_memory(arch, "qlora", best, 2048, **kwargs).total_gib <= 22.5
    assert estimate_memory(arch, "qlora", best + 1, 2048, **kwargs).total_gib > 22.5
    assert largest_micro_batch(arch, "full", 2048, 22.5) == 0


@pytest.mark.parametrize(("method", "batch", "checkpointing", "measured_gib"), [
    ("lora", 4, "full", 21.0), ("qlora", 4, "full", 10.2), ("lora", 4, "none", 83.5), ("full", 1, "full", 63.6)])
def test_seed_recipe_estimates_are_within_10_percent_of_the_h200_measurements(method, batch, checkpointing,
                                                                             measured_gib):
    # notes/performance.md: seed_recipe.py on one H200, Llama-3.1-8B shape, rows of 2048, TRL 1.16's fused LM head,
    # pure bf16 (full: bf16 AdamW states). These peaks were known when the model was written: this test guards the
    # model against regressions, the blind check is bench/advise_memory.py on the GPU.
    arch = architecture_from_config(catalogue_config("llama-3.1-8b"))
    est = estimate_memory(arch, method, batch, 2048, lora_trainable=41_943_040, adapted_in_features=38_912,
                          checkpointing=checkpointing, logits="fused", full_precision="bf16")
    assert est.peak_allocated_gib == pytest.approx(measured_gib, rel=0.10)


@pytest.mark.parametrize("checkpointing", ["full", "none"])
@pytest.mark.parametrize(("method", "precision"), [("lora", "bf16"), ("full", "bf16"), ("full", "mixed")])
def test_whole_step_peak_estimate_is_within_10_percent_of_a_real_cpu_training_step(method, precision,
                                                                                   checkpointing):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = tiny_config(hidden=256, intermediate=768, layers=4, heads=8, kv_heads=2, head_dim=32, vocab=4000)
    torch.manual_seed(0)
    dtype = torch.float32 if precision == "mixed" else torch.bfloat16  # mixed: fp32 master weights + autocast
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=GUIDE_TARGETS))
    if checkpointing == "full":
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, config.vocab_size, (4, 256))

    def step():  # gradient accumulation over 2 micro-batches: gradients exist while the second one runs
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # the plain loss: full logits
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the first step creates the AdamW states
    states = [t for s in optimizer.state.values() for t in s.values()]
    with PeakLiveBytes(list(model.parameters()) + states) as tracker:
        step()

    arch = architecture_from_config(config)
    trainable, adapted = lora_trainable_params(config, 16, GUIDE_TARGETS) if method == "lora" else (0, 0)
    est = estimate_memory(arch, method, 4, 256, lora_r=16, lora_trainable=trainable, adapted_in_features=adapted,
                          checkpointing=checkpointing, logits="full", full_precision=precision, dropout_mask_bytes=4)
    assert est.peak_allocated_gib * GIB == pytest.approx(tracker.peak, rel=0.10)

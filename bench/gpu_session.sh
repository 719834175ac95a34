#!/usr/bin/env bash
# The GPU runs of issues 8, 9 and 11, in phases (each one device call).
# Run from the repository root on the GPU machine, with the carried wheels in .whl/ and an unchanged copy of
# ../shared/bench/seed_recipe.py in .gpu/ (both ignored folders):
#   bash bench/gpu_session.sh A   # 2 GPUs: one-GPU runs side by side (fast-engine ablations vs the seed recipe,
#                                 #   full fine-tuning and LoRA of the 8B shape)
#   bash bench/gpu_session.sh B   # 2 GPUs: FSDP2 full/LoRA 8B, LoRA 70B, tests/gpu (2-GPU NCCL tests)
#   bash bench/gpu_session.sh C   # all GPUs of a 4- or 8-GPU machine: full 8B, LoRA 8B and 70B
#   bash bench/gpu_session.sh D|E # 2 GPUs: compiled/eager one-GPU vs FSDP2 pairs; E adds tests/gpu
#   bash bench/gpu_session.sh F   # 2 GPUs: profiles of one- and two-GPU steps
#   bash bench/gpu_session.sh H   # 2 GPUs, one job each: QLoRA variants vs the seed; full FT 4K vs 8K rows
#   bash bench/gpu_session.sh I   # 2 GPUs: H's QLoRA pair in both orders, then tests/gpu
#   bash bench/gpu_session.sh J   # 2 GPUs: NCCL tests, compiled 1- vs 2-GPU LoRA and 2-GPU full FT (fused loss)
#   bash bench/gpu_session.sh K   # 2 GPUs: J's runs again (decoder output by hook), a model-head control, NCCL tests
#   bash bench/gpu_session.sh L   # 1 GPU: tests/gpu/test_fast_path.py, QLoRA rows of 4096/5120/5632 tokens vs the seed
#   bash bench/gpu_session.sh M   # 1 GPU: the seed's QLoRA, then QLoRA rows of 5632 tokens alone
#   bash bench/gpu_session.sh N   # 2 GPUs, one job each: QLoRA / LoRA with checkpointed inputs in CPU memory and
#                                 #   longer rows vs their seeds; tests/gpu/test_fast_path.py
#   bash bench/gpu_session.sh O   # 2 GPUs, one job each: N's closest variants twice each, LoRA with 1-3 layers kept
#   bash bench/gpu_session.sh P   # 2 GPUs, one job each: O again after the loop's sync fixes; tests/gpu
#   bash bench/gpu_session.sh Q   # 2 GPUs, one job each: 8B LoRA as planned within the seed's memory, offload vs not
#   bash bench/gpu_session.sh R   # Q with 5 untimed steps
#   bash bench/gpu_session.sh S   # 1 GPU: LoRA's best configuration vs the seed, profiled, and without the adapters'
#                                 #   dropout (what it costs); a profiled one-GPU full fine-tuning run
#   bash bench/gpu_session.sh T   # 1 GPU: full FT 8B, fp32 masters + bitsandbytes 8-bit AdamW vs bf16 weights with
#                                 #   stochastic rounding + torchao 8-bit AdamW (rows of 4096 and 12288 tokens)
#   bash bench/gpu_session.sh V   # 1 GPU: T again (both optimizers, the torchao one twice) and rows of 8192 tokens
#   bash bench/gpu_session.sh W   # 1 GPU: `tunesmith train` (the CLI) full fine-tuning of a 1.2B model with
#                                 #   optim adamw_8bit_bf16 (bench/gpu_cli_check.py)
#   bash bench/gpu_session.sh U   # 1 GPU: LoRA's best configuration vs the seed, adapters' dropout masks from an
#                                 #   integer hash instead of Philox (each measured twice); tests/gpu/test_fast_path.py
#                                 #   (the hash variant lives at commit 6a6cb00: run U from there)
#   bash bench/gpu_session.sh X   # 1 GPU: tests/gpu/test_adapter_dropout_cuda.py; LoRA's best configuration vs the seed
#                                 #   with the adapters' dropout drawn inside lora_A (fused) and PEFT's, twice each
#   bash bench/gpu_session.sh Y   # 1 GPU: bench/adapter_dropout.py (one adapter's kernels vs PEFT's way, launch
#                                 #   settings swept), tests/gpu/test_adapter_dropout_cuda.py, then X's LoRA runs
#   bash bench/gpu_session.sh Z   # 1 GPU: bench/adapter_dropout.py; LoRA with the fused dropout, 29 and 30 of 32
#                                 #   layers checkpointed (each twice), PEFT's dropout as the control
#   bash bench/gpu_session.sh AA  # 1 GPU: tests/gpu/test_adapter_dropout_cuda.py and test_fast_path.py (verbose,
#                                 #   durations), then the seed and LoRA with the fused dropout, 29 layers checkpointed
#   bash bench/gpu_session.sh AB  # 1 GPU: the seed's QLoRA, then QLoRA's best configuration with the fused dropout
#                                 #   and with PEFT's, twice each (not run yet)
#   bash bench/gpu_session.sh AC  # 1 GPU: the seed's LoRA, then LoRA with some layers offloaded whole (their saved
#                                 #   activations in CPU memory instead of recomputed) against 29 checkpointed layers
#   bash bench/gpu_session.sh AD  # 1 GPU: the offload's CUDA tests; the seed's LoRA, then AC's variants with CPU
#                                 #   memory pinned beforehand (a first untimed variant), each offload count warm
#   bash bench/gpu_session.sh AE  # 1 GPU: CUDA tests (offload, grouped key/value heads, packed rows); the seed's
#                                 #   LoRA, then offloaded layers again with the key/value heads unexpanded where the
#                                 #   kernel takes them; 8B LoRA as `tunesmith train` plans it within the seed's memory
#   bash bench/gpu_session.sh AF  # 1 GPU: AE's planned run again with 8 untimed steps (CPU memory pinned by then)
#   bash bench/gpu_session.sh AG  # 1 GPU: the FP8 base's CUDA tests, then the seed's LoRA vs the planned 8B LoRA
#                                 #   with the bf16 base and with the FP8 base (issue 26; $OUT/fp8_base.json, .md)
#   bash bench/gpu_session.sh AH  # 1 GPU: the FP8 full-fine-tuning CUDA tests, then 8B full fine-tuning as planned
#                                 #   with bf16 products and with FP8 products ($OUT/fp8_full.json, .md)
#   bash bench/gpu_session.sh AL  # 1 GPU: AJ without the seed's LoRA and the pool-off arm
#   bash bench/gpu_session.sh AI  # 1 GPU: tests/gpu/test_pinned_cuda.py, then 8B LoRA as planned within the seed's
#                                 #   memory with its pinned CPU memory allocated up front and without (fresh process
#                                 #   each): step_times_s and step3_vs_steady in $OUT/scale_out_AI.jsonl
#   bash bench/gpu_session.sh AJ  # 1 GPU: the pinned pool's tests, DPO LoRA vs TRL's DPOTrainer (Liger's DPO head,
#                                 #   the pool), the seed's LoRA, then AI's pool on/off pair (issues 25, 26)
#   bash bench/gpu_session.sh AK  # 1 GPU: AH's 8B runs with torchao's two FP8 recipes (rowwise, tensorwise) against
#                                 #   bf16, no tests: which recipe src/tunesmith/train/fp8_training.py should use
# Results: $OUT/scale_out_<phase>.jsonl, $OUT/fast_engine_*.json(.md), $OUT/logs_<phase>.tgz.
set -uo pipefail
phase=${1:?usage: gpu_session.sh A|B|C|D|E|F|H|I|J|K|L|M|N|O|P|Q|R|S|T|U|V|W|X|Y|Z|AA|AB|AC|AD|AE|AF|AG|AH|AI|AJ|AK|AL}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-/tmp/out}
w=/tmp/work_$phase
mkdir -p "$w" "$out"
J=$out/scale_out_$phase.jsonl
so() {  # so GPUS NPROC TIMEOUT ARGS...: one scale-out configuration
  local gpus=$1 n=$2 t=$3; shift 3
  if [ "$n" = 1 ]; then
    CUDA_VISIBLE_DEVICES=$gpus timeout "$t" python3 bench/scale_out.py run --jsonl "$J" "$@"
  else
    CUDA_VISIBLE_DEVICES=$gpus timeout "$t" torchrun --standalone --nproc-per-node "$n" \
      bench/scale_out.py run --jsonl "$J" "$@"
  fi
}
fe() {  # fe GPU NAME ARGS...: fast-engine parts (seed recipe unchanged + tunesmith variants)
  local gpu=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout 540 python3 bench/fast_engine.py all --seed-script .gpu/seed_recipe.py \
    --out "$w/fe_$name" --part-timeout 300 "$@"
  cp "$w/fe_$name/fast_engine.json" "$out/fast_engine_$name.json" 2>/dev/null
}
fe_part() {  # fe_part GPU METHOD TIMEOUT PART_TIMEOUT VARIANT...: the seed's METHOD, then tunesmith's variants
  local gpu=$1 m=$2 t=$3 pt=$4 v args=()
  shift 4
  for v in "$@"; do args+=("--$m-variant" "$v"); done
  CUDA_VISIBLE_DEVICES=$gpu timeout "$t" python3 bench/fast_engine.py all --seed-script .gpu/seed_recipe.py \
    --out "$w/fe_$m" --part-timeout "$pt" --parts "seed-$m" "$m" "${args[@]}"
  cp "$w/fe_$m/fast_engine.json" "$out/fast_engine_$m.json"
}
lora_then_tests() {  # lora_then_tests TIMEOUT PART_TIMEOUT VARIANT...: GPU 1: LoRA part, then tests/gpu
  fe_part 1 lora "$@"  # until second 560 of the phase
  CUDA_VISIBLE_DEVICES=1 timeout $(( 560 - $(date +%s) + start )) python3 -m pytest -q -s -p no:cacheprovider \
    tests/gpu/test_fast_path.py
}
qlora_twice=(  # phases O and P: QLoRA rows of 9216 and 8192 tokens, each measured twice
  "name=rows9216+offload,bs=2,rows=9216,compile=on,emb=cpu,offload=on,warmup=4"
  "name=rows8192+offload,bs=2,rows=8192,compile=on,emb=cpu,offload=on,warmup=3"
  "name=rows9216+offload(again),bs=2,rows=9216,compile=on,emb=cpu,offload=on,warmup=3"
  "name=rows8192+offload(again),bs=2,rows=8192,compile=on,emb=cpu,offload=on,warmup=3"
)
start=$(date +%s)
if [ "$phase" = A ]; then  # two GPUs, one job each
  nvidia-smi topo -m > "$w/topo.txt" 2>&1
  python3 -c "import torch; print(torch.__version__, torch.cuda.device_count())"
  ( fe 0 qlora --parts seed-qlora qlora --qlora-variant "name=fast-bs2,bs=2,profile=on" \
      --qlora-variant "name=fast-bs2+compile,bs=2,compile=on"
    so 0 1 200 --shape 8b --method full --label full-1 --bs 2
  ) > "$w/gpu0.log" 2>&1 &
  ( fe 1 lora --parts seed-lora lora --lora-variant "name=fast,profile=on" --lora-variant "name=nockpt,ckpt=0" \
      --lora-variant "name=fast+compile,compile=on,profile=on" --lora-variant "name=nockpt+compile,ckpt=0,compile=on"
    so 1 1 200 --shape 8b --method lora --label lora-1 --bs 4
  ) > "$w/gpu1.log" 2>&1 &
  wait
elif [ "$phase" = B ]; then  # FSDP2 on two GPUs (and the one-GPU full fine-tuning rerun)
  so 0 1 200 --shape 8b --method full --label full-1 --bs 2
  so 0,1 2 200 --shape 8b --method full --label full-2 --bs 2
  so 0,1 2 200 --shape 8b --method lora --label lora-2 --bs 4
  so 0,1 2 240 --shape 70b --method lora --label lora70-2 --bs 2 --steps 3 --warmup 1
  timeout 300 python3 -m pytest -q -s -p no:cacheprovider tests/gpu
elif [ "$phase" = D ]; then  # two GPUs: eager and compiled, one GPU then FSDP2 on two, in one call
  ( so 0 1 200 --shape 8b --method full --label full-1 --bs 2
    so 0 1 260 --shape 8b --method full --label full-1c --bs 2 --compile ) > "$w/gpu0.log" 2>&1 &
  ( so 1 1 200 --shape 8b --method lora --label lora-1 --bs 4
    so 1 1 260 --shape 8b --method lora --label lora-1c --bs 4 --compile ) > "$w/gpu1.log" 2>&1 &
  wait
  so 0,1 2 200 --shape 8b --method full --label full-2 --bs 2
  so 0,1 2 260 --shape 8b --method full --label full-2c --bs 2 --compile
  so 0,1 2 200 --shape 8b --method lora --label lora-2 --bs 4
  so 0,1 2 260 --shape 8b --method lora --label lora-2c --bs 4 --compile
  if [ $(( $(date +%s) - start )) -lt 460 ]; then timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/gpu; fi
elif [ "$phase" = E ]; then  # two GPUs: eager one-GPU baselines, FSDP2 with the local-shard clip, tests/gpu
  so 0 1 200 --shape 8b --method full --label full-1 --bs 2 > "$w/gpu0.log" 2>&1 &
  so 1 1 200 --shape 8b --method lora --label lora-1 --bs 4 > "$w/gpu1.log" 2>&1 &
  wait
  so 0,1 2 200 --shape 8b --method full --label full-2 --bs 2
  so 0,1 2 200 --shape 8b --method lora --label lora-2 --bs 4
  timeout 240 python3 -m pytest -q -s -p no:cacheprovider tests/gpu
elif [ "$phase" = F ]; then  # two GPUs: where a 2-GPU LoRA step's extra ~0.35 s goes (profiles of steps 3-4)
  so 0 1 200 --shape 8b --method lora --label lora-1-prof --bs 4 --profile
  so 0,1 2 200 --shape 8b --method lora --label lora-2-prof --bs 4 --profile
  so 0,1 2 200 --shape 8b --method full --label full-2-prof --bs 2 --profile
elif [ "$phase" = H ]; then  # two GPUs, one job each: QLoRA in <= 8 GB (issue 8); full FT rows of 8K (issue 9)
  ( fe 0 qlora --parts seed-qlora qlora --part-timeout 420 --qlora-variant "name=bs2+compile,bs=2,compile=on" \
      --qlora-variant "name=bs2+compile+emb-cpu,bs=2,compile=on,emb=cpu" \
      --qlora-variant "name=bs1+compile,bs=1,compile=on" ) > "$w/gpu0.log" 2>&1 &
  ( CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_fast_path.py
    so 1 1 260 --shape 8b --method full --label full-1c --bs 2 --compile
    so 1 1 260 --shape 8b --method full --label full-1c-bs4 --bs 4 --compile ) > "$w/gpu1.log" 2>&1 &
  wait
elif [ "$phase" = I ]; then  # H's QLoRA pair in both orders (the first compiled variant pays late recompiles),
  # the one-GPU CUDA tests beside it, then the two-GPU ones
  ( fe 0 qlora --parts seed-qlora qlora --part-timeout 420 \
      --qlora-variant "name=bs2+compile+emb-cpu,bs=2,compile=on,emb=cpu" \
      --qlora-variant "name=bs2+compile,bs=2,compile=on" \
      --qlora-variant "name=bs2+compile+emb-cpu-again,bs=2,compile=on,emb=cpu" ) > "$w/gpu0.log" 2>&1 &
  ( CUDA_VISIBLE_DEVICES=1 timeout 240 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_fast_path.py
  ) > "$w/gpu1.log" 2>&1 &
  wait
  timeout 240 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_distributed_cuda.py
elif [ "$phase" = J ]; then  # two GPUs: FSDP2 with the fused loss and replicated LoRA's frozen weights outside
  # FSDP2 — the NCCL tests first, then the compiled one- and two-GPU pairs alone on the host
  timeout 200 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_distributed_cuda.py
  so 0 1 200 --shape 8b --method lora --label lora-1c --bs 4 --compile
  so 0,1 2 200 --shape 8b --method lora --label lora-2c --bs 4 --compile
  so 0,1 2 200 --shape 8b --method full --label full-2c --bs 2 --compile
  if [ $(( $(date +%s) - start )) -lt 420 ]; then
    CUDA_VISIBLE_DEVICES=0 timeout $(( 520 - $(date +%s) + start )) python3 -m pytest -q -s -p no:cacheprovider \
      tests/gpu/test_fast_path.py
  fi
elif [ "$phase" = K ]; then  # J again with the decoder's output read by a hook (J's output_hidden_states path
  # ran 2-GPU steps 2.5x slower), the model-head loss as a control, then the NCCL tests
  so 0 1 200 --shape 8b --method lora --label lora-1c --bs 4 --compile
  so 0,1 2 200 --shape 8b --method lora --label lora-2c --bs 4 --compile
  so 0,1 2 200 --shape 8b --method full --label full-2c --bs 2 --compile
  so 0,1 2 200 --shape 8b --method lora --label lora-2c-head --bs 4 --compile --loss model-head
  timeout $(( 540 - $(date +%s) + start )) python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_distributed_cuda.py
elif [ "$phase" = L ]; then  # one GPU: the CUDA fast-path tests, then QLoRA with packed rows between 4K and 6K
  # tokens (train.packed_row_tokens) against the seed, the first compiled variant given 4 untimed steps
  CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_fast_path.py
  CUDA_VISIBLE_DEVICES=0 timeout $(( 550 - $(date +%s) + start )) python3 bench/fast_engine.py all \
    --seed-script .gpu/seed_recipe.py --out "$w/fe_qlora" --part-timeout 300 --parts seed-qlora qlora \
    --qlora-variant "name=rows4096+emb-cpu,bs=2,compile=on,emb=cpu,warmup=4" \
    --qlora-variant "name=rows5120+emb-cpu,bs=2,rows=5120,compile=on,emb=cpu" \
    --qlora-variant "name=rows5632+emb-cpu,bs=2,rows=5632,compile=on,emb=cpu"
  cp "$w/fe_qlora/fast_engine.json" "$out/fast_engine_qlora.json" 2>/dev/null
elif [ "$phase" = M ]; then  # one GPU: L's fastest QLoRA row size again, alone after the seed (first compiled
  # variant of the call, 4 untimed steps)
  CUDA_VISIBLE_DEVICES=0 timeout 220 python3 bench/fast_engine.py all \
    --seed-script .gpu/seed_recipe.py --out "$w/fe_qlora" --part-timeout 150 --parts seed-qlora qlora \
    --qlora-variant "name=rows5632+emb-cpu,bs=2,rows=5632,compile=on,emb=cpu,warmup=4"
  cp "$w/fe_qlora/fast_engine.json" "$out/fast_engine_qlora.json" 2>/dev/null
elif [ "$phase" = N ]; then  # two GPUs, one job each: checkpointed inputs in CPU memory (train.offload_checkpoints)
  # with longer rows, QLoRA on GPU 0 and LoRA on GPU 1 against their seeds; then the CUDA fast-path tests on GPU 1
  fe_part 0 qlora 530 420 "name=rows8192+offload,bs=2,rows=8192,compile=on,emb=cpu,offload=on,warmup=4" \
    "name=rows12288+offload,bs=2,rows=12288,compile=on,emb=cpu,offload=on" \
    "name=rows10240+offload,bs=2,rows=10240,compile=on,emb=cpu,offload=on" \
    "name=rows5632,bs=2,rows=5632,compile=on,emb=cpu" \
    "name=rows12288+sync-offload,bs=2,rows=12288,compile=on,emb=cpu,offload=sync" > "$w/gpu0.log" 2>&1 &
  lora_then_tests 400 300 "name=rows8192,compile=on,warmup=4" \
    "name=rows12288+offload,rows=12288,compile=on,emb=cpu,offload=on" \
    "name=rows12288+offload+ckpt31,rows=12288,compile=on,emb=cpu,offload=on,ckpt=31" \
    "name=rows12288+sync-offload,rows=12288,compile=on,emb=cpu,offload=sync" > "$w/gpu1.log" 2>&1 &
  wait
elif [ "$phase" = O ]; then  # two GPUs, one job each: N's closest QLoRA and LoRA variants again, each measured
  # twice in the call (the first compiled variant of a call runs slowest), and un-checkpointed layers under the
  # LoRA seed's memory
  fe_part 0 qlora 540 440 "${qlora_twice[@]}" > "$w/gpu0.log" 2>&1 &
  fe_part 1 lora 540 440 "name=rows12288+offload+ckpt31,rows=12288,compile=on,emb=cpu,offload=on,ckpt=31,warmup=4" \
    "name=rows12288+offload+ckpt30,rows=12288,compile=on,emb=cpu,offload=on,ckpt=30,warmup=3" \
    "name=rows12288+offload+ckpt29,rows=12288,compile=on,emb=cpu,offload=on,ckpt=29,warmup=3" \
    "name=rows12288+offload,rows=12288,compile=on,emb=cpu,offload=on,warmup=3" \
    "name=rows12288+sync-offload+ckpt31,rows=12288,compile=on,emb=cpu,offload=sync,ckpt=31,warmup=3" \
    "name=rows12288+offload+ckpt31(again),rows=12288,compile=on,emb=cpu,offload=on,ckpt=31,warmup=3" \
    > "$w/gpu1.log" 2>&1 &
  wait
elif [ "$phase" = P ]; then  # two GPUs, one job each: O's variants after the loop stopped reading the loss per
  # micro-batch and the CPU-memory embeddings stopped waiting for the GPU; then the CUDA fast-path tests on GPU 1
  fe_part 0 qlora 540 440 "${qlora_twice[@]}" > "$w/gpu0.log" 2>&1 &
  lora_then_tests 330 250 "name=rows12288+offload+ckpt30,rows=12288,compile=on,emb=cpu,offload=on,ckpt=30,warmup=4" \
    "name=rows12288+offload+ckpt31,rows=12288,compile=on,emb=cpu,offload=on,ckpt=31,warmup=3" \
    "name=rows12288+offload+ckpt30(again),rows=12288,compile=on,emb=cpu,offload=on,ckpt=30,warmup=3" \
    "name=rows12288+offload+ckpt30+emb-gpu,rows=12288,compile=on,offload=on,ckpt=30,warmup=3" > "$w/gpu1.log" 2>&1 &
  wait
elif [ "$phase" = Q ]; then  # two GPUs, one job each: 8B LoRA as `tunesmith train` plans it within the LoRA seed's
  # 21.15 GiB (memory limit 22.99 × the plan's 0.92 headroom), rows of 12288 tokens, with and without
  # offload_checkpoints
  so 0 1 250 --shape 8b --method lora --bs 4 --rows 12288 --memory-limit 22.99 --compile \
    --label lora-seed-budget > "$w/gpu0.log" 2>&1 &
  so 1 1 250 --shape 8b --method lora --bs 4 --rows 12288 --memory-limit 22.99 --compile --offload off \
    --label lora-seed-budget-no-offload > "$w/gpu1.log" 2>&1 &
  wait
elif [ "$phase" = R ]; then  # Q again with 5 untimed steps instead of 2 (pinned-memory allocations of the first
  # steps), offload on GPU 0, the control on GPU 1
  so 0 1 200 --shape 8b --method lora --bs 4 --rows 12288 --memory-limit 22.99 --compile --warmup 5 \
    --label lora-seed-budget-warm5 > "$w/gpu0.log" 2>&1 &
  so 1 1 200 --shape 8b --method lora --bs 4 --rows 12288 --memory-limit 22.99 --compile --offload off --warmup 5 \
    --label lora-seed-budget-no-offload-warm5 > "$w/gpu1.log" 2>&1 &
  wait
elif [ "$phase" = S ]; then  # one GPU: where LoRA's step time goes (profile by kernel family), what the adapters'
  # dropout costs in time and memory (information only: the workload keeps dropout 0.05), and full FT's profile
  ckpt30="rows=12288,compile=on,emb=cpu,offload=on,ckpt=30"
  fe_part 0 lora 340 270 "name=ckpt30,$ckpt30,warmup=4" "name=ckpt30(again),$ckpt30,warmup=3" \
    "name=ckpt30+profile,$ckpt30,profile=on" "name=ckpt30+no-dropout,$ckpt30,dropout=0,warmup=3" \
    "name=ckpt28+no-dropout,rows=12288,compile=on,emb=cpu,offload=on,ckpt=28,dropout=0,warmup=3" > "$w/gpu0.log" 2>&1
  so 0 1 160 --shape 8b --method full --bs 2 --compile --profile --label full-1c-profile >> "$w/gpu0.log" 2>&1
elif [ "$phase" = T ]; then  # one GPU: full FT's one-GPU optimizers side by side (the plan's other choices fixed)
  so 0 1 130 --shape 8b --method full --bs 2 --compile --optim adamw_8bit --label full-1c-bnb8-fp32masters
  so 0 1 180 --shape 8b --method full --bs 2 --compile --label full-1c-auto
  so 0 1 170 --shape 8b --method full --bs 4 --rows 12288 --compile --label full-1c-auto-rows12288
elif [ "$phase" = V ]; then  # one GPU: phase T's comparison repeated in another call, plus 8192-token rows
  so 0 1 100 --shape 8b --method full --bs 2 --compile --optim adamw_8bit --label full-1c-bnb8-fp32masters
  so 0 1 100 --shape 8b --method full --bs 2 --compile --label full-1c-auto
  so 0 1 80 --shape 8b --method full --bs 2 --compile --label full-1c-auto-again
  so 0 1 100 --shape 8b --method full --bs 4 --compile --label full-1c-auto-rows8192
elif [ "$phase" = W ]; then  # one GPU: the product path of the new optimizer, config → CLI → model folder
  CUDA_VISIBLE_DEVICES=0 timeout 170 python3 bench/gpu_cli_check.py --methods full --full-optim adamw_8bit_bf16 \
    --work "$w/cli" --json-out "$out/gpu_cli_check_full.json" > "$w/gpu0.log" 2>&1
elif [ "$phase" = U ]; then  # one GPU: the same masks' distribution from a cheaper generator, then the CUDA tests
  ckpt30="rows=12288,compile=on,emb=cpu,offload=on,ckpt=30"
  fe_part 0 lora 330 260 "name=ckpt30,$ckpt30,warmup=4" "name=ckpt30+hash-dropout,$ckpt30,dropout=hash,warmup=3" \
    "name=ckpt30(again),$ckpt30,warmup=3" "name=ckpt30+hash-dropout(again),$ckpt30,dropout=hash,warmup=3" \
    > "$w/gpu0.log" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout $(( 480 - $(date +%s) + start )) python3 -m pytest -q -s -p no:cacheprovider \
    tests/gpu/test_fast_path.py >> "$w/gpu0.log" 2>&1
elif [ "$phase" = X ]; then  # one GPU: the adapters' fused dropout — its CUDA tests, then the product's LoRA run
  # with it (the default) against PEFT's dropout in the same process, each twice, and without dropout (information)
  CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_adapter_dropout_cuda.py \
    > "$w/tests.log" 2>&1
  ckpt30="rows=12288,compile=on,emb=cpu,offload=on,ckpt=30"
  fe_part 0 lora 420 340 "name=ckpt30+peft-dropout,$ckpt30,dropout=peft,warmup=4" "name=ckpt30+fused,$ckpt30,warmup=3" \
    "name=ckpt30+peft-dropout(again),$ckpt30,dropout=peft,warmup=3" "name=ckpt30+fused(again),$ckpt30,warmup=3" \
    "name=ckpt30+no-dropout,$ckpt30,dropout=0,warmup=3" > "$w/gpu0.log" 2>&1
elif [ "$phase" = Y ]; then  # one GPU: the kernels alone, their tests, then the product's LoRA run as in X
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 bench/adapter_dropout.py --json-out "$out/adapter_dropout.json" \
    > "$w/micro.log" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout 100 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_adapter_dropout_cuda.py \
    > "$w/tests.log" 2>&1
  ckpt30="rows=12288,compile=on,emb=cpu,offload=on,ckpt=30"
  fe_part 0 lora 330 270 "name=ckpt30+peft-dropout,$ckpt30,dropout=peft,warmup=4" "name=ckpt30+fused,$ckpt30,warmup=3" \
    "name=ckpt30+peft-dropout(again),$ckpt30,dropout=peft,warmup=3" "name=ckpt30+fused(again),$ckpt30,warmup=3" \
    > "$w/gpu0.log" 2>&1
elif [ "$phase" = Z ]; then  # one GPU: the kernels alone, then LoRA keeping one more layer in the memory they free
  CUDA_VISIBLE_DEVICES=0 timeout 120 python3 bench/adapter_dropout.py --json-out "$out/adapter_dropout.json" \
    > "$w/micro.log" 2>&1
  c="rows=12288,compile=on,emb=cpu,offload=on"
  fe_part 0 lora 400 330 "name=ckpt29+fused,$c,ckpt=29,warmup=4" "name=ckpt30+fused,$c,ckpt=30,warmup=3" \
    "name=ckpt29+fused(again),$c,ckpt=29,warmup=3" "name=ckpt30+peft-dropout,$c,ckpt=30,dropout=peft,warmup=3" \
    > "$w/gpu0.log" 2>&1
elif [ "$phase" = AA ]; then  # one GPU: the CUDA tests with time to finish, then one more seed / fused pair
  CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m pytest -v --durations=0 -p no:cacheprovider \
    tests/gpu/test_adapter_dropout_cuda.py tests/gpu/test_fast_path.py > "$w/tests.log" 2>&1
  c="rows=12288,compile=on,emb=cpu,offload=on,ckpt=29"
  fe_part 0 lora 250 190 "name=ckpt29+fused,$c,warmup=4" "name=ckpt29+fused(again),$c,warmup=3" > "$w/gpu0.log" 2>&1
elif [ "$phase" = AB ]; then  # one GPU: QLoRA within 8 GB with the fused dropout against PEFT's
  q="bs=2,rows=9216,compile=on,emb=cpu,offload=on"
  fe_part 0 qlora 480 400 "name=rows9216+fused,$q,dropout=fused,warmup=4" \
    "name=rows9216+peft-dropout,$q,dropout=peft,warmup=3" "name=rows9216+fused(again),$q,dropout=fused,warmup=3" \
    "name=rows9216+peft-dropout(again),$q,dropout=peft,warmup=3" \
    > "$w/gpu0.log" 2>&1
elif [ "$phase" = AC ]; then  # one GPU: layers offloaded whole instead of recomputed, against ckpt29
  c="rows=12288,compile=on,emb=cpu,offload=on"
  fe_part 0 lora 520 440 "name=ckpt29,$c,ckpt=29,warmup=4" "name=ckpt22+offl8,$c,ckpt=22,offl=8,warmup=3" \
    "name=ckpt18+offl12,$c,ckpt=18,offl=12,warmup=3" "name=ckpt14+offl16,$c,ckpt=14,offl=16,warmup=3" \
    "name=ckpt19+offl10(keep3),$c,ckpt=19,offl=10,warmup=3" "name=ckpt29(again),$c,ckpt=29,warmup=3" \
    "name=ckpt22+offl8(again),$c,ckpt=22,offl=8,warmup=3" > "$w/gpu0.log" 2>&1
elif [ "$phase" = AD ]; then  # one GPU: the offload's tests, then offloaded layer counts measured warm
  CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -v -p no:cacheprovider tests/gpu/test_fast_path.py \
    -k "activations_in_cpu_memory" > "$w/tests.log" 2>&1
  c="rows=12288,compile=on,emb=cpu,offload=on"
  fe_part 0 lora $(( 570 - $(date +%s) + start )) 400 "name=pin-cpu-memory(untimed),$c,ckpt=14,offl=16,warmup=5" \
    "name=ckpt29,$c,ckpt=29,warmup=3" "name=ckpt22+offl8,$c,ckpt=22,offl=8,warmup=3,shapes=on" \
    "name=ckpt20+offl10,$c,ckpt=20,offl=10,warmup=3" "name=ckpt18+offl12,$c,ckpt=18,offl=12,warmup=3" \
    "name=ckpt24+offl6,$c,ckpt=24,offl=6,warmup=3" "name=ckpt29(again),$c,ckpt=29,warmup=3" \
    "name=ckpt22+offl8(again),$c,ckpt=22,offl=8,warmup=3" > "$w/gpu0.log" 2>&1
elif [ "$phase" = AE ]; then  # one GPU: tests, offloaded layers with unexpanded key/value heads, the planned run
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -v -p no:cacheprovider tests/gpu/test_fast_path.py \
    -k "activations_in_cpu_memory or grouped_key_value or packed_rows" > "$w/tests.log" 2>&1
  c="rows=12288,compile=on,emb=cpu,offload=on"
  fe_part 0 lora $(( 430 - $(date +%s) + start )) 260 "name=pin-cpu-memory(untimed),$c,ckpt=14,offl=16,warmup=4" \
    "name=ckpt22+offl8,$c,ckpt=22,offl=8,warmup=3" "name=ckpt29,$c,ckpt=29,warmup=3" \
    "name=ckpt22+offl8(again),$c,ckpt=22,offl=8,warmup=3" > "$w/gpu0.log" 2>&1
  so 0 1 $(( 575 - $(date +%s) + start )) --shape 8b --method lora --bs 4 --rows 12288 --memory-limit 22.99 \
    --compile --warmup 5 --label lora-seed-budget-planned > "$w/planned.log" 2>&1
elif [ "$phase" = AF ]; then  # one GPU: the planned run, warm
  so 0 1 200 --shape 8b --method lora --bs 4 --rows 12288 --memory-limit 22.99 --compile --warmup 8 --steps 6 \
    --label lora-seed-budget-planned-warm8 > "$w/planned.log" 2>&1
elif [ "$phase" = AG ]; then  # one GPU: the FP8 base's tests, then seed vs bf16 base vs FP8 base in one call
  CUDA_VISIBLE_DEVICES=0 timeout 180 python3 -m pytest -v --durations=0 -p no:cacheprovider \
    tests/gpu/test_fp8_base_cuda.py > "$w/tests.log" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout 400 python3 bench/scale_out.py fp8 --seed-script .gpu/seed_recipe.py \
    --out "$w/fp8" --warmup 6 --steps 5 > "$w/gpu0.log" 2>&1
  cp "$w/fp8/fp8_base.json" "$w/fp8/fp8_base.md" "$out/" 2>/dev/null
elif [ "$phase" = AI ]; then  # one GPU: the pinned pool's tests, then the planned 8B LoRA with the pool and without
  CUDA_VISIBLE_DEVICES=0 timeout 50 python3 -m pytest -v --durations=0 -p no:cacheprovider \
    tests/gpu/test_pinned_cuda.py > "$w/tests.log" 2>&1
  # QLoRA is not here: scale_out builds random-weight LoRA/full models only (no NF4 base)
  for pool in on off; do  # each in a fresh process: torch's host allocator starts empty
    so 0 1 140 --shape 8b --method lora \
      --bs 4 --rows 12288 --memory-limit 22.99 --compile --warmup 2 --steps 6 --pinned-pool "$pool" \
      --label "lora-seed-budget-pool-$pool" > "$w/planned_$pool.log" 2>&1
  done
elif [ "$phase" = AJ ]; then  # one GPU: DPO vs TRL (pinned pool, Liger head), then the seed's LoRA and AI's pair
  CUDA_VISIBLE_DEVICES=0 timeout 50 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_pinned_cuda.py \
    > "$w/tests.log" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout 260 python3 bench/dpo_vs_trl.py all --shape 8b --steps 8 --warmup 3 --seq 2048 \
    --no-uncompiled --out "$w/dpo" --workdir "$w/dpo/work" > "$w/dpo.log" 2>&1
  cp "$w/dpo/dpo_vs_trl.json" "$out/dpo_vs_trl.json" 2>/dev/null
  CUDA_VISIBLE_DEVICES=0 timeout 80 python3 -c "import json, sys; sys.path.insert(0, 'bench'); \
from fast_engine import run_seed; print('SEED ' + json.dumps(run_seed('.gpu/seed_recipe.py', \
['--method', 'lora', '--varlen'], 75)))" > "$w/seed.log" 2>&1
  grep -h '^SEED ' "$w/seed.log" | cut -c6- > "$out/seed_lora.json"
  for pool in on off; do
    so 0 1 120 --shape 8b --method lora \
      --bs 4 --rows 12288 --memory-limit 22.99 --compile --warmup 2 --steps 6 --pinned-pool "$pool" \
      --label "lora-seed-budget-pool-$pool" > "$w/planned_$pool.log" 2>&1
  done
elif [ "$phase" = AH ]; then  # one GPU: FP8 full fine-tuning's tests, then bf16 vs FP8 products in one call
  CUDA_VISIBLE_DEVICES=0 timeout 90 python3 -m pytest -v --durations=0 -p no:cacheprovider \
    tests/gpu/test_fp8_training_cuda.py > "$w/tests.log" 2>&1
  # the two 8B runs share what is left of 4 minutes (cold compilation: the first steps of each take the most)
  CUDA_VISIBLE_DEVICES=0 python3 bench/scale_out.py fp8full --out "$w/fp8full" --warmup 4 --steps 4 \
    --run-timeout 120 --deadline-s $(( 235 - $(date +%s) + start )) > "$w/gpu0.log" 2>&1
  cp "$w/fp8full/fp8_full.json" "$w/fp8full/fp8_full.md" "$w/fp8full/fp8_full.jsonl" "$out/" 2>/dev/null
elif [ "$phase" = AK ]; then  # one GPU: bf16 vs FP8 products with either torchao recipe, in one call
  CUDA_VISIBLE_DEVICES=0 python3 bench/scale_out.py fp8full --out "$w/fp8full" --warmup 4 --steps 4 \
    --recipes rowwise tensorwise --run-timeout 90 --deadline-s 235 > "$w/gpu0.log" 2>&1
  cp "$w/fp8full/fp8_full.json" "$w/fp8full/fp8_full.md" "$w/fp8full/fp8_full.jsonl" "$out/" 2>/dev/null
elif [ "$phase" = AL ]; then  # one GPU, short: AJ without the seed and the pool-off arm (what the time left allowed)
  CUDA_VISIBLE_DEVICES=0 timeout 50 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_pinned_cuda.py \
    > "$w/tests.log" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout 240 python3 bench/dpo_vs_trl.py all --shape 8b --steps 8 --warmup 3 --seq 2048 \
    --no-uncompiled --out "$w/dpo" --workdir "$w/dpo/work" > "$w/dpo.log" 2>&1
  cp "$w/dpo/dpo_vs_trl.json" "$w/dpo.log" "$out/" 2>/dev/null
  so 0 1 120 --shape 8b --method lora --bs 4 --rows 12288 --memory-limit 22.99 --compile --warmup 2 --steps 6 \
    --pinned-pool on --label "lora-seed-budget-pool-on" > "$w/planned_on.log" 2>&1
else  # C: four or eight GPUs (issue 11), when that machine is lent
  n=$(python3 -c "import torch; print(torch.cuda.device_count())")
  all=$(seq -s, 0 $((n - 1)))
  so "$all" "$n" 240 --shape 8b --method full --label "full-$n" --bs 2
  so "$all" "$n" 240 --shape 8b --method lora --label "lora-$n" --bs 4
  so "$all" "$n" 300 --shape 70b --method lora --label "lora70-$n" --bs 2 --steps 3 --warmup 1
fi > "$w/main.log" 2>&1
echo "phase $phase took $(( $(date +%s) - start )) s" | tee -a "$w/main.log"
grep -h "RESULT\|plan:\|passed\|failed\|Error\|error" "$w"/*.log | cut -c1-400 | tail -60
tar -czf "$out/logs_$phase.tgz" -C "$w" --exclude='*.safetensors' --exclude='model-*' --exclude='run-*' \
  --exclude='*-[0-9]' . 2>/dev/null
ls -la "$out"

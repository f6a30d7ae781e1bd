#!/usr/bin/env bash
# Every GPU measurement the docs cite, in groups that each fit a 10-minute slot.
#
#   bash benchmarks/gpu_runs.sh GROUP [OUT_DIR]      (OUT_DIR defaults to $OUT, then runs/gpu)
#
# Groups (estimated H100 wall time; the estimates marked * are not measured yet):
#   kernels      paged decode (all columns, ~2.5 min), chunked prefill vs XLA
#                (~1.3 min), generate_paged bf16/fp32 (fp32 > 90 s)        ~ 8 min *
#   prefill      chunked prefill alone: Pallas and Triton kernels vs XLA      ~ 2.5 min *
#   kernel-tables  paged decode (four rows, all columns, traced) + chunked prefill ~ 5 min *
#   layout       Triton decode on token-major vs head-major pages (four rows)   ~ 2 min *
#   prefill-tiles  Triton chunked prefill, query tiles of 16/32 tokens, 16-64-token
#                steps, 4/8 warps, four rows                                   ~ 2 min *
#   tables-quick paged decode (four rows, no Pallas, traced) + chunked prefill    ~ 5 min *
#   prefill-confirm  chunked prefill (default + neighbours), engine vs HF at 8 x 512 ~ 4 min
#   prefill-diag Triton chunked prefill with the causal mask on the diagonal steps only,
#                at 64/128-row tiles and 16-64-token steps, vs the default     ~ 2 min *
#   mla          absorbed MLA decode kernel vs XLA gather and torch SDPA      ~ 3 min *
#   sweep        Triton kernel tunables per row                            ~ 4 min *
#   experiments  kv-cost-gpu (2.9 min) + cache-speedup-gpu (2.3 min)       ~ 5.5 min
#   prefix       prefix-sharing-gpu + tiered-cache-gpu, few-shot workloads
#                (prefix-sharing also system-prompt): 1.9 + 3.0 min       ~ 5 min
#   pinned       tiered-cache-gpu few-shot with host_staging: pinned       ~ 3 min
#   pinned-slots the same with host_staging: pinned-slots (L2 in pinned memory) ~ 3 min *
#   multiturn-prefix   prefix-sharing, multi-turn workload                 > 10 min
#                (2026-12-06: three calls. The pool-1536 no-cache prefills compile for
#                 100 s to 3 min each on the XLA path; a call cut off keeps its finished
#                 settings: commit the run's finished/ to
#                 experiments/prefix_sharing/results-gpu-multiturn/ and run again; on a
#                 still-warm machine the persistent compilation cache keeps the programs)
#   prefix-kernels     prefix-sharing, all workloads, attention=auto (kernels) ~ 5-9 min *
#   multiturn-tiers    tiered-cache, multi-turn workload                    ~ 6-8 min *
#                (the first try ran both in one slot and ran out of time in each:
#                 4.5 min for 4 of 13 prefix-sharing steps, 15 of 18 tiered steps)
#   engine       engine vs Hugging Face generate (offline grid + online)   ~ 7 min (412 s, H100)
#   engine-b8    the same at batch 1 and 8: burst lengths, overlapped bursts;
#                and the decode-step profile                              ~ 5.1 min
#   fused        the fused decode-layer kernels: burst A/B (traced), GPU check  ~ 5 min *
#   launch       XLA's Triton custom call vs jax-triton: a chained kernel, a GPU check
#                of both decode steps under it, the burst under each launcher  ~ 6 min *
#   launch-engine  engine vs HF static, 8/32 x 512, kernels launched by XLA  ~ 3 min *
#   fused-kernels  the fused layer kernels alone over launch settings, vs XLA   ~ 4 min *
#   fused-kernels-xla  the same, launched as XLA's Triton custom call          ~ 4 min *
#   fused-tune   that sweep picks each layer piece's launch or XLA (FusedLaunch), then
#                the burst: Flax step vs fused step picked vs default (traced)  ~ 7 min *
#   next-round   check-xla (90 s), the split A/B (70 s), the fused sweep's quick grid at 8
#                rows (150 s), engine vs HF with the default and picked fused rows (200 s)
#                                                                             ~ 8.5 min *
#   confirm      check-bf16, then engine vs HF over batch 8/32 x 512/2048 with the
#                shipped fused launch, 3 repeats                              ~ 9 min *
#   check-bf16   its bfloat16 rows alone (2026-12-07: float32 took the whole 90 s) ~ 1.5 min *
#   check-xla    the GPU check of both decode steps under the XLA launch    ~ 1 min *
#   fused-engine   engine vs HF static, 8/32 x 512, with and without them     ~ 5 min *
#   decode-append  the decode kernel writing the step's K/V: GPU check, burst A/B
#                (--scatter-writes), engine vs HF at 8/32 x 512 (2026-12-06: the parts
#                ran in separate calls; engine_vs_hf alone took 57-156 s)     ~ 4 min *
#   serve        kvjax serve-bench on configs/serve-bench-gpu.yaml         ~ 3 min *
#   preempt      the same under memory pressure: recompute vs swap preemption ~ 9 min *
#   probe-recipe attention-sweep mha alone at five shapes (recipe 2 otherwise) ~ 6.2 min
#   train-a      attention-sweep: mha + its conversions, gqa-4, gqa-2     ~ 4 min
#   train-b      attention-sweep: mqa, mla-64, mla-128                    ~ 3.7 min
#   train-ft     attention-sweep: mha + conversions, each fine-tuned 400 steps ~ 3 min *
#                (the first recipe, 8 layers at 1024 tokens, took 3.2 min a variant on
#                 an H100; the second ~80 s. A group cut off keeps its finished
#                 variants: run it again to do the rest)
#                (each finished variant lands in attention_sweep/finished/; commit those
#                 to experiments/attention_sweep/results-gpu/finished/ and a later group,
#                 or a CPU run of the config, reuses them and writes the whole table)
# Where the GPU machine lacks packages (flax, chex, jax-triton ...), install wheels first
# and put them on PYTHONPATH; the script only sets PYTHONPATH to the repository root.
set -uo pipefail
group="${1:?usage: gpu_runs.sh GROUP [OUT_DIR]}"
out="${2:-${OUT:-runs/gpu}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export OUT="$out"  # benchmarks/paged_decode.py writes its JSON there
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
py=python3
run() {  # name, seconds, command...: a step that cannot sink the others
    local name="$1" limit="$2"; shift 2
    echo "=== $name"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep -v 'it/s\]$' | tail -40
    echo "=== $name: exit ${PIPESTATUS[0]}"
}
resume() {  # committed finished parts -> the run's output folder, so a run picks up there
    mkdir -p "$2"
    [ -d "$1/finished" ] && cp -r "$1/finished" "$2/"
    return 0
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
case "$group" in
  kernels)
    run paged_decode 330 $py benchmarks/paged_decode.py
    run chunked_prefill 200 $py benchmarks/chunked_prefill.py
    run generate_paged_bf16 120 $py benchmarks/generate_paged.py --batch 32 --prompt 512 --new 64
    run generate_paged_fp32 150 $py benchmarks/generate_paged.py --batch 8 --prompt 512 --new 32 \
        --dtype float32 ;;
  prefill)
    run chunked_prefill 200 $py benchmarks/chunked_prefill.py ;;
  kernel-tables)  # the decode and prefill tables of docs/paged-decode-kernel.md, no generate
    run paged_decode 300 $py benchmarks/paged_decode.py --rows 8x4096,32x1024,32x4096,64x4096 --trace
    run chunked_prefill 200 $py benchmarks/chunked_prefill.py ;;
  layout)  # token-major vs head-major pages in the Triton decode kernel (same pages transposed)
    run paged_decode_layout 300 $py benchmarks/paged_decode.py --sweep triton --head-major \
        --rows 8x4096,32x1024,32x4096,64x4096 --triton 32:auto:4:4:1,64:auto:4:4:1 ;;
  prefill-tiles)  # query tiles of 16 and 32 tokens (64 / 128 rows), 16-64-token steps
    run chunked_prefill_tiles 240 $py benchmarks/chunked_prefill.py --no-pallas --triton \
        '[{}, {"block_tokens": 32, "num_stages": 3}, {"block_q": 16, "block_tokens": 64, "num_stages": 3},
          {"block_q": 32, "num_warps": 8}, {"block_q": 32, "num_warps": 8, "block_tokens": 32, "num_stages": 3},
          {"block_q": 32, "num_warps": 8, "block_tokens": 64, "num_stages": 3},
          {"block_q": 32, "block_tokens": 32, "num_stages": 3}]' ;;
  prefill-diag)  # the causal mask only on the diagonal steps, at several tiles, vs one loop
    run chunked_prefill_diag 240 $py benchmarks/chunked_prefill.py --no-pallas --triton \
        '[{}, {"split_diagonal": true}, {"split_diagonal": true, "block_tokens": 32, "num_stages": 3},
          {"split_diagonal": true, "block_tokens": 64, "num_stages": 3},
          {"split_diagonal": true, "block_q": 32, "num_warps": 8, "block_tokens": 64, "num_stages": 3},
          {"split_diagonal": true, "block_q": 32, "num_warps": 8, "block_tokens": 32, "num_stages": 3}]' ;;
  tables-quick)  # the decode table without the Pallas columns (traced), then chunked prefill
    run paged_decode 220 $py benchmarks/paged_decode.py --no-pallas --budget-s 150 --trace \
        --rows 8x4096,32x1024,32x4096,64x4096
    run chunked_prefill 150 $py benchmarks/chunked_prefill.py --no-pallas ;;
  prefill-confirm)  # chunked prefill at the default and its neighbours, then the engine's
    # prefill (TTFT) and decode against HF at 8 x 512
    run chunked_prefill 120 $py benchmarks/chunked_prefill.py --no-pallas
    run engine_vs_hf_8x512 300 $py benchmarks/engine_vs_hf.py --out "$out/engine_vs_hf_8x512.json" \
        --batches 8 --prompts 512 --max-batch 8 --decode-steps 8 --overlap-bursts \
        --skip-hf-dynamic --skip-online --repeats 2 --no-bare-burst ;;
  mla)
    run mla_decode 300 $py benchmarks/mla_decode.py ;;
  sweep)
    run sweep_triton 540 $py benchmarks/paged_decode.py --sweep triton ;;
  experiments)
    run kv_cost 260 $py -m kvjax.cli run configs/kv-cost-gpu.yaml --output-dir "$out/kv_cost"
    run cache_speedup 280 $py -m kvjax.cli run configs/cache-speedup-gpu.yaml \
        --output-dir "$out/cache_speedup" ;;
  prefix)
    run prefix_sharing 200 $py -m kvjax.cli run configs/prefix-sharing-gpu.yaml \
        --output-dir "$out/prefix_sharing" --set "workloads=[system-prompt, few-shot]"
    run tiered_cache 300 $py -m kvjax.cli run configs/tiered-cache-gpu.yaml \
        --output-dir "$out/tiered_cache" --set "workloads=[few-shot]" ;;
  pinned)
    run tiered_cache_pinned 300 $py -m kvjax.cli run configs/tiered-cache-gpu.yaml \
        --output-dir "$out/tiered_cache_pinned" --set "workloads=[few-shot]" \
        --set host_staging=pinned ;;
  pinned-slots)
    run tiered_cache_pinned_slots 300 $py -m kvjax.cli run configs/tiered-cache-gpu.yaml \
        --output-dir "$out/tiered_cache_pinned_slots" --set "workloads=[few-shot]" \
        --set host_staging=pinned-slots ;;
  multiturn-prefix)  # JAX_LOG_COMPILES: the log shows what each compile costs
    resume experiments/prefix_sharing/results-gpu-multiturn "$out/prefix_sharing_multiturn"
    # POOLS (default: the config's) runs a subset of the pools, e.g. POOLS="[1536]"
    run prefix_sharing_multiturn 520 env JAX_LOG_COMPILES=1 $py -m kvjax.cli run configs/prefix-sharing-gpu.yaml \
        --output-dir "$out/prefix_sharing_multiturn" --set "workloads=[multi-turn]" \
        ${POOLS:+--set "pool_blocks=$POOLS"} ;;
  prefix-kernels)  # all three workloads with the pool on the kernels (attention=auto)
    run prefix_sharing_kernels 560 $py -m kvjax.cli run configs/prefix-sharing-gpu.yaml \
        --output-dir "$out/prefix_sharing_kernels" --set attention=auto ;;
  multiturn-tiers)
    run tiered_cache_multiturn 560 $py -m kvjax.cli run configs/tiered-cache-gpu.yaml \
        --output-dir "$out/tiered_cache_multiturn" --set "workloads=[multi-turn]" ;;
  engine)
    run engine_vs_hf 560 $py benchmarks/engine_vs_hf.py --out "$out/engine_vs_hf.json" ;;
  engine-b8)  # batch 1 and 8 only, engine max_batch 32: burst lengths 8/16, serial vs overlapped
    run engine_vs_hf_b8 420 $py benchmarks/engine_vs_hf.py --out "$out/engine_vs_hf_b8.json" \
        --batches 1 8 --prompts 512 2048 --max-batch 32 --decode-steps 8 16 --overlap-bursts \
        --skip-hf-dynamic --skip-online
    run decode_step_profile 240 $py benchmarks/decode_step_profile.py --trace \
        --cells 8x512 32x512 --attention triton --out "$out/decode_step_profile.json" ;;
  fused)  # the fused decode-layer kernels: GPU check, burst A/B (fused vs Flax + Triton
    # decode kernel), engine vs HF static at 8/32 x 512 with and without them
    run decode_step_profile_fused 200 $py benchmarks/decode_step_profile.py \
        --cells 8x512 32x512 8x2048 --attention fused triton --no-half --trace --reps 5 \
        --out "$out/decode_step_profile_fused.json"
    run check_fused_decode 150 $py benchmarks/check_fused_decode.py ;;
  launch)  # XLA's Triton custom call vs jax-triton: one kernel chained, then the decode
    # burst (default Flax step and fused step) under each launcher
    run xla_triton_launch 100 $py benchmarks/xla_triton_launch.py
    KVJAX_TRITON_LAUNCH=xla run check_launch_xla 150 $py benchmarks/check_fused_decode.py \
        --reference-attention xla
    run decode_step_profile_launch_xla 150 $py benchmarks/decode_step_profile.py --launch xla \
        --cells 8x512 32x512 --attention triton fused --no-half --trace --reps 5 \
        --out "$out/decode_step_profile_launch_xla.json"
    run decode_step_profile_launch_jax_triton 120 $py benchmarks/decode_step_profile.py \
        --launch jax-triton --cells 8x512 32x512 --attention triton fused --no-half --reps 5 \
        --out "$out/decode_step_profile_launch_jax_triton.json" ;;
  launch-engine)  # engine vs HF static, 8/32 x 512, the kernels launched by XLA
    KVJAX_TRITON_LAUNCH=xla run engine_vs_hf_launch_xla 300 $py benchmarks/engine_vs_hf.py \
        --out "$out/engine_vs_hf_launch_xla.json" --batches 8 32 --prompts 512 \
        --max-batch 32 --decode-steps 8 --overlap-bursts --skip-hf-dynamic --skip-online ;;
  fused-kernels)  # the fused layer kernels alone over launch settings, vs XLA
    run fused_layer_kernels 280 $py benchmarks/fused_layer_kernels.py \
        --out "$out/fused_layer_kernels.json" ;;
  fused-kernels-xla)  # the same, the kernels launched as XLA's Triton custom call
    KVJAX_TRITON_LAUNCH=xla run fused_layer_kernels_xla 300 $py \
        benchmarks/fused_layer_kernels.py --out "$out/fused_layer_kernels_xla.json" ;;
  next-round)  # the GPU check under the XLA launch (bf16 rows decide the default launcher),
    # then splits-fused-engine with tighter limits
    KVJAX_TRITON_LAUNCH=xla run check_launch_xla 90 $py benchmarks/check_fused_decode.py \
        --reference-attention xla --dtypes bfloat16
    run decode_step_profile_splits 70 $py benchmarks/decode_step_profile.py --launch xla \
        --cells 8x512 32x512 --attention triton --split-programs 256 64 16 --no-half \
        --reps 5 --out "$out/decode_step_profile_splits.json"
    KVJAX_TRITON_LAUNCH=xla run fused_layer_kernels_xla 150 $py \
        benchmarks/fused_layer_kernels.py --batches 8 --out "$out/fused_layer_kernels_xla.json" \
        --launch-out "$out/fused_launch_picked.json"
    KVJAX_TRITON_LAUNCH=xla run engine_vs_hf_fused_tuned 200 $py benchmarks/engine_vs_hf.py \
        --out "$out/engine_vs_hf_fused_tuned.json" --batches 8 32 --prompts 512 \
        --max-batch 32 --decode-steps 8 --overlap-bursts --skip-hf-dynamic --skip-online \
        --repeats 3 --fused-decode --fused-launch "$out/fused_launch_picked.json" ;;
  confirm)  # the bfloat16 GPU check under the XLA launch, then engine vs HF static at
    # batch 8/32 x 512/2048 with overlapped bursts and the shipped fused launch
    KVJAX_TRITON_LAUNCH=xla run check_launch_xla_bf16 120 $py benchmarks/check_fused_decode.py \
        --reference-attention xla --dtypes bfloat16
    KVJAX_TRITON_LAUNCH=xla run engine_vs_hf_grid 420 $py benchmarks/engine_vs_hf.py \
        --out "$out/engine_vs_hf_grid.json" --batches 8 32 --prompts 512 2048 \
        --max-batch 32 --decode-steps 8 --overlap-bursts --skip-hf-dynamic --skip-online \
        --repeats 3 --fused-decode --fused-launch configs/fused-launch-qwen2.5-0.5b-h100.json \
        --no-bare-burst ;;
  check-bf16)  # the bfloat16 rows of the GPU check under the XLA launch alone
    KVJAX_TRITON_LAUNCH=xla run check_launch_xla_bf16 150 $py benchmarks/check_fused_decode.py \
        --reference-attention xla --dtypes bfloat16 ;;
  fused-tune)  # the kernel sweep picks each layer piece's launch (or XLA); the burst A/B
    KVJAX_TRITON_LAUNCH=xla run fused_layer_kernels_xla 300 $py \
        benchmarks/fused_layer_kernels.py --out "$out/fused_layer_kernels_xla.json" \
        --launch-out "$out/fused_launch_picked.json"
    run decode_step_profile_fused_tuned 200 $py benchmarks/decode_step_profile.py --launch xla \
        --cells 8x512 32x512 --attention triton "fused=$out/fused_launch_picked.json" fused \
        --no-half --trace --out "$out/decode_step_profile_fused_tuned.json" ;;
  engine-trace)  # the engine's decode window vs its bare burst: host clock, GPU idle gaps
    KVJAX_TRITON_LAUNCH=xla run engine_trace 200 $py benchmarks/engine_trace.py \
        --out "$out/engine_trace.json" ;;
  combine)  # the split merge as reductions vs elementwise over the splits (XLA launch)
    run decode_step_profile_combine 200 $py benchmarks/decode_step_profile.py --launch xla \
        --cells 8x512 32x512 --attention triton --combine reduce unrolled --no-half \
        --trace --reps 5 --hlo-dir "$out/hlo" --out "$out/decode_step_profile_combine.json" ;;
  check-xla)  # the GPU check of both decode steps, every kernel launched by XLA
    KVJAX_TRITON_LAUNCH=xla run check_launch_xla 150 $py benchmarks/check_fused_decode.py \
        --reference-attention xla ;;
  fused-engine)
    run engine_vs_hf_fused 300 $py benchmarks/engine_vs_hf.py --out "$out/engine_vs_hf_fused.json" \
        --batches 8 32 --prompts 512 --max-batch 32 --decode-steps 8 --overlap-bursts \
        --fused-decode --skip-hf-dynamic --skip-online ;;
  decode-append)  # the K/V write inside the decode kernel: GPU check, A/B of the burst, engine
    run check_decode_append 60 $py benchmarks/check_decode_append.py
    run decode_step_profile_scatter 100 $py benchmarks/decode_step_profile.py --scatter-writes \
        --cells 8x512 32x512 --attention triton --no-half --trace --reps 5 \
        --out "$out/decode_step_profile_scatter.json"
    run decode_step_profile 100 $py benchmarks/decode_step_profile.py \
        --cells 8x512 32x512 8x2048 --attention triton --no-half --trace --reps 5 \
        --out "$out/decode_step_profile.json"
    run engine_vs_hf_b8b32 230 $py benchmarks/engine_vs_hf.py --out "$out/engine_vs_hf_b8b32.json" \
        --batches 8 32 --prompts 512 --max-batch 32 --decode-steps 8 --overlap-bursts \
        --skip-hf-dynamic --skip-online ;;
  serve)
    run serve_bench 540 $py -m kvjax.cli serve-bench --config configs/serve-bench-gpu.yaml \
        --output-dir "$out/serve_bench" --no-progress ;;
  preempt)  # the serve workload at 32 req/s in a pool of 1024 blocks: recompute vs swap
    for mode in recompute swap; do
      run "serve_bench_$mode" 290 $py -m kvjax.cli serve-bench \
          --config configs/serve-bench-gpu.yaml --output-dir "$out/serve_bench_$mode" \
          --no-progress --set engine.num_blocks=1024 --set engine.preemption=$mode \
          --set engine.swap_blocks=$([ $mode = swap ] && echo 8192 || echo 0) \
          --set workload.num_requests=128 --set workload.arrival_rate=32
    done ;;
  probe-recipe)  # mha alone at five shapes, the second recipe otherwise: which learns retrieval?
    c=configs/attention-sweep-gpu.yaml
    common=(--set "variants=[mha]" --set "conversions=[]" --set save_checkpoints=false)
    run probe_w128_l2 110 $py -m kvjax.cli run $c --output-dir "$out/w128_l2" "${common[@]}" \
        --set hidden_size=128 --set num_layers=2 --set num_heads=4 --set head_dim=32 \
        --set mha_intermediate_size=256 --set mla_rope_head_dim=8 --set convert_rope_dim=4
    run probe_w256_l2 110 $py -m kvjax.cli run $c --output-dir "$out/w256_l2" "${common[@]}" \
        --set hidden_size=256 --set num_layers=2 --set num_heads=4 --set head_dim=64 \
        --set mha_intermediate_size=768
    run probe_w256_l4 110 $py -m kvjax.cli run $c --output-dir "$out/w256_l4" "${common[@]}" \
        --set hidden_size=256 --set num_layers=4 --set num_heads=4 --set head_dim=64 \
        --set mha_intermediate_size=768
    run probe_w512_l2 110 $py -m kvjax.cli run $c --output-dir "$out/w512_l2" "${common[@]}" \
        --set num_layers=2
    run probe_w512_l4_lr3e-4 110 $py -m kvjax.cli run $c --output-dir "$out/w512_l4_lr3e-4" \
        "${common[@]}" --set peak_lr=0.0003 ;;
  train-a|train-b)  # one sweep in two runs: finished variants are kept and reused
    resume experiments/attention_sweep/results-gpu "$out/attention_sweep"
    part=(--set "variants=[mha, gqa-4, gqa-2]")
    [ "$group" = train-b ] && part=(--set "variants=[mqa, mla-64, mla-128]" --set "conversions=[]")
    run "attention_sweep_${group#train-}" 560 $py -m kvjax.cli run configs/attention-sweep-gpu.yaml \
        --output-dir "$out/attention_sweep" "${part[@]}" ;;
  train-ft)  # mha (trained again: no checkpoint is committed) + its conversions, each also
             # fine-tuned 400 steps (10% of training) -> attention_sweep_finetune/
    run attention_sweep_finetune 560 $py -m kvjax.cli run configs/attention-sweep-gpu.yaml \
        --output-dir "$out/attention_sweep_finetune" --set "variants=[mha]" \
        --set finetune_steps=400 --set save_checkpoints=false ;;
  *) echo "unknown group $group" >&2; exit 2 ;;
esac

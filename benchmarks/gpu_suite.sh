#!/usr/bin/env bash
# Every GPU figure issue 6 asks for, on one H100/H200 (GPT-2-small shape, prompt 64, 128 new tokens, bf16):
# rollout vs HF generate at batch 64 and 256, per-token scaling, and a PPO iteration vs TRL's PPOTrainer
# (episodes/s and peak memory) at batch 64 and 256; the static/compiled decode tests on the GPU; extras.
#
#   bash benchmarks/gpu_wheels.sh               # here, once: wheels for packages the GPU image lacks
#   SUITE_SECONDS=570 bash benchmarks/gpu_suite.sh targets  # there, in the repository root (carry .whl)
#   bash benchmarks/gpu_suite.sh tests rollout  # some parts: targets, tests, rollout, scaling, ppo, update,
#                                               # deferred, fused (and the extras profile, components, lora,
#                                               # evaluate, weight_copy)
#   DRY_RUN=1 bash benchmarks/gpu_suite.sh all  # anywhere: print every command, run none
#
# A session's device time is short (15 minutes, the machine's start included), and each compiled shape
# compiles once per process (35-56 s on an H100), so the parts are sized for calls of under 10 minutes, most
# decisive first: "targets" (the four figures the issue sets targets for, about 6-7 minutes), then "tests",
# then "update components", "deferred fused", "rollout ppo" (the per-token KL), "scaling". Each benchmark runs
# under a time limit, RUN_LIMIT seconds (300 unless set), and, with SUITE_SECONDS set, within that many seconds
# of the suite's start: a run that hangs is stopped with its log complete instead of the whole call being cut
# off, and a run with under 30 s left is skipped. Each log ends with the command's exit status and seconds, so
# later calls can be sized.
#
# Output goes to $OUT (or benchmarks/results/), one log per benchmark, to be copied into docs/benchmarks.md.
set -uo pipefail
known="targets tests rollout scaling ppo update deferred fused profile components lora evaluate weight_copy"
parts=${*:-targets tests rollout scaling ppo update deferred fused}
parts=${parts/#all/$known}  # "all" first: every part
for part in $parts; do
  if [[ " $known " != *" $part "* ]]; then
    echo "unknown part '$part'; the parts: all $known" >&2
    exit 2
  fi
done
want() { [[ " $parts " == *" $1 "* ]]; }
dry=$([ "${DRY_RUN:-0}" = 1 ] && echo 1)
out=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1 TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false
if [ -z "$dry" ]; then
  mkdir -p "$out"
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:$PWD || exit 1
  fi
  export PYTHONPATH=${PYTHONPATH:-$PWD}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/device.txt"
fi
run() {  # name, command...: log the command, its output, exit status and seconds; a failure or a time-out does
  # not stop the other benchmarks. DRY_RUN=1 prints the command only.
  local name=$1; shift
  if [ -n "$dry" ]; then echo "\$ $*"; return 0; fi
  local limit=${RUN_LIMIT:-300} start=$SECONDS left rc
  if [ -n "${SUITE_SECONDS:-}" ]; then
    left=$(( SUITE_SECONDS - SECONDS ))
    if (( left < 30 )); then
      echo "skipped ($left s left of SUITE_SECONDS=$SUITE_SECONDS): $*" | tee -a "$out/$name.txt"
      return 0
    fi
    (( left < limit )) && limit=$left
  fi
  echo "\$ $*" | tee -a "$out/$name.txt"
  timeout -k 10 -s INT "$limit" "$@" 2>&1 | grep --line-buffered -v '^\[transformers\]' | tee -a "$out/$name.txt"
  rc=${PIPESTATUS[0]}
  echo "(exit $rc, $((SECONDS - start)) s)" | tee -a "$out/$name.txt"
}
gpt2="--shape gpt2 --prompt 64 --device cuda --bf16"
# The four figures issue 6 sets targets for, in one call: a compiled rollout with the deferred KL (the batch
# trainers' way, as TRL computes it) against HF generate, and a PPO iteration against TRL's, at batch 64 and 256.
if want targets; then
  for batch in 64 256; do
    run targets python3 benchmarks/rollout.py $gpt2 --new 128 --batch $batch --decoding compiled --defer-kl
  done
  run targets python3 benchmarks/ppo_vs_trl.py $gpt2 --new 128 --batch 64 --iterations 2 --warmup 1 \
    --decoding compiled --defer-kl
  run targets python3 benchmarks/ppo_vs_trl.py $gpt2 --new 128 --batch 256 --minibatches 4 --iterations 2 \
    --warmup 1 --decoding compiled --defer-kl
fi
# The numbers: the static and compiled (CUDA-graph) decode paths against the dynamic cache, and the deferred KL
# against the per-token one, on the GPU; then the main job's three stages there, in bf16.
if want tests; then
  # --continue-on-collection-errors: a module the image lacks fails its own file, not the whole list
  RUN_LIMIT=${RUN_LIMIT:-540} run gpu_tests env TEXTENV_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider \
    --continue-on-collection-errors \
    tests/test_static_decoding.py tests/test_deferred_kl.py \
    tests/test_policy_prefetch.py tests/test_compiled_step_overhead.py tests/test_fused_sampling.py tests/test_host_transfer.py \
    tests/test_ppo_run.py::test_a_restored_optimizer_keeps_adams_step_on_the_cpu \
    tests/test_pipeline.py::test_main_job_on_a_task_with_a_programmatic_reward \
    tests/test_pipeline.py::test_main_job_from_a_bf16_lm_folder_on_the_test_device \
    tests/test_determinism_and_vector.py::test_seeded_rng_repeats_its_draws_and_restores_the_callers_stream \
    tests/test_lora_weights.py tests/test_autocast_weight_copy.py
fi
for batch in 64 256; do
  want rollout || break
  run rollout python3 benchmarks/rollout.py $gpt2 --new 128 --batch $batch --decoding dynamic
  run rollout env TORCH_LOGS=graph_breaks,recompiles python3 benchmarks/rollout.py $gpt2 --new 128 --batch $batch \
    --decoding compiled
done
if want scaling; then  # 11 compiled shapes per decoder (5 capacities, and their attention windows): its own call;
  # the uncached loop does not depend on the decoding and was measured with it before (docs/benchmarks.md)
  RUN_LIMIT=${RUN_LIMIT:-540} run scaling python3 benchmarks/scaling.py $gpt2 --batch 64 --lengths 32,64,128,256,512 --decoding compiled \
    --no-uncached
fi
if want profile; then  # not in the default parts: where a compiled rollout's time goes, and a PPO update's
  for batch in 64 256; do
    run profile_$batch python3 benchmarks/profile_rollout.py $gpt2 --new 128 --batch $batch --decoding compiled
  done
  run profile_update python3 benchmarks/profile_rollout.py $gpt2 --new 128 --batch 64 --decoding compiled --defer-kl \
    --update
fi
if want components; then  # not in the default parts: a step's pieces, and dynamo's guard check per compiled call
  for batch in 64 256; do
    run components python3 benchmarks/components.py $gpt2 --new 128 --batch $batch
  done
fi
if want weight_copy; then  # not in the default parts: PPO's bf16 rollout step, its float32 weights converted at
  # every forward (autocast) vs held in bf16 per batch (agents.autocast_weight_copy, PPO's default)
  for batch in 64 256; do
    run autocast_weights python3 benchmarks/autocast_weights.py --shape gpt2 --prompt 64 --device cuda --new 128 \
      --batch $batch --decoding compiled
  done
fi
if want update; then  # the update micro-batch's peak memory: chunked taken-token log-probs vs the plain log-softmax
  run update_memory python3 benchmarks/update_memory.py $gpt2 --new 128 --batch 64 --repeats 3
fi
if want evaluate; then  # not in the default parts: `textenv evaluate --device cuda` (builds the sentiment task's models first, ~2 min)
  run gpu_evaluate env TEXTENV_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider \
    tests/test_pipeline.py::test_evaluate_command
fi
if want lora; then  # not in the default parts: a LoRA policy's device memory beside its reference (seconds)
  run lora_memory python3 benchmarks/lora_memory.py --shape gpt2 --bf16 --device cuda
fi
if want ppo; then
  run ppo_vs_trl python3 benchmarks/ppo_vs_trl.py $gpt2 --new 128 --batch 64 --iterations 2 --warmup 1 --decoding compiled
  run ppo_vs_trl python3 benchmarks/ppo_vs_trl.py $gpt2 --new 128 --batch 256 --minibatches 4 --iterations 2 \
    --warmup 1 --decoding compiled
fi
# What the host-bound batch 64 owes to two host-side changes, against a baseline in the same call (the targets
# part has the rollouts with the deferred KL at both batch sizes): the policy's forward queued when the agent asks
# (the order before PolicyLink.prefetch), and every guard checked at every step (before guards_once_per_batch).
if want deferred; then
  run rollout_deferred python3 benchmarks/rollout.py $gpt2 --new 128 --batch 64 --decoding compiled --defer-kl
  run rollout_deferred python3 benchmarks/rollout.py $gpt2 --new 128 --batch 64 --decoding compiled --defer-kl --no-prefetch
  run rollout_deferred python3 benchmarks/rollout.py $gpt2 --new 128 --batch 64 --decoding compiled --defer-kl \
    --guards-every-step
fi
if want fused; then  # the eager log-softmax and inverse CDF instead of fused sampling, each against fused sampling
  for batch in 256 64; do
    run rollout_fused python3 benchmarks/rollout.py $gpt2 --new 128 --batch $batch --decoding compiled --defer-kl
    run rollout_fused python3 benchmarks/rollout.py $gpt2 --new 128 --batch $batch --decoding compiled --defer-kl \
      --no-fused-sampling
  done
fi

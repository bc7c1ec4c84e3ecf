#!/usr/bin/env bash
# Issue 19 on the lent H200, in calls of at most 10 minutes on one warm machine
# (bench/README-gpu-attention.md says what each call carries and what to expect).
#
#   bash bench/gpu_attention_session.sh 1   # Triton: backward sweep, verify (both modes), GPU tests;
#                                           # stashes the carried wheels in /tmp for call 2
#   bash bench/gpu_attention_session.sh 2   # joins + installs the CuTe DSL stack; cudnn_flex and
#                                           # FA4: smoke, bench attention (every method), verify,
#                                           # GPU tests -- as far as the time allows
#   bash bench/gpu_attention_session.sh 3   # what call 2 left for lack of time (no carry)
#
# Every step runs under a deadline (BUDGET_S, default 560 s after the start); a step that does not
# fit is reported as not run. Logs and results go to $OUT (at most 8 files come back), compact
# tables are printed last.
set -uo pipefail
CALL="${1:?usage: gpu_attention_session.sh 1|2|3}"
OUT="${OUT:-/tmp/prefixlm_out}"
mkdir -p "$OUT"
START=$(date +%s)
BUDGET_S="${BUDGET_S:-560}"
PY="${PY:-python3}"
export PYTHONUNBUFFERED=1
WHEELS=/tmp/prefixlm_wheels          # persists on the warm machine between calls
SITE=/tmp/site
PENDING=/tmp/prefixlm_pending_steps  # steps call 2 could not fit, for call 3
LIBS_CU13=nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
LIBS_CU13_SHA256=50191a381d8cc1393373ae0bc879b0aefa9a256c23c22d4fa1c2fe3dfe57bc90
LOG="$OUT/session$CALL.log"
SUMMARY="$OUT/summary$CALL.txt"
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# step NAME MIN_SECONDS 'COMMAND': runs COMMAND (a bash string; the functions below are exported)
# with the time left, if at least MIN_SECONDS, output appended to $LOG; records ok / FAILED rc /
# TIMEOUT / not run in the summary. Call 2's steps that did not run or timed out go to call 3.
step() {
  local name="$1" need="$2" cmd="$3"
  local t; t=$(left)
  if (( t < need )); then
    note "[$name] not run: $t s left, needs ~$need s"
    [[ "$CALL" == 2 ]] && echo "$name" >>"$PENDING"
    return 0
  fi
  echo "===== [$name] $(date +%T) ($t s left): $cmd" | tee -a "$LOG"
  local s0; s0=$(date +%s)
  timeout --kill-after=10 "$t" bash -c "$cmd" >>"$LOG" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - s0 ))
  if (( rc == 0 )); then note "[$name] ok (${dt} s)"
  elif (( rc == 124 || rc == 137 )); then
    note "[$name] TIMEOUT after ${dt} s (partial output in $(basename "$LOG"))"
    [[ "$CALL" == 2 ]] && echo "$name" >>"$PENDING"
  else note "[$name] FAILED rc=$rc (${dt} s)"; fi
  return 0
}

TRITON_TESTS=tests/attention/backends/test_triton.py
FLEX_TESTS=tests/attention/backends/test_cudnn_flex.py
ANCHOR_TESTS=tests/bench/test_anchors.py
TWO_PASS_TESTS="tests/attention/backends/test_cudnn.py tests/attention/backends/test_fa3.py"
SWEEP=bench/triton_sweep.py

env_report() {
  {
    echo "call $CALL on $(hostname) $(date -Is)"
    nvidia-smi -L
    nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
    git log --oneline -1 2>/dev/null
  } 2>&1 | tee -a "$SUMMARY"
}

stash_wheels() {
  # Carried paths land in the checkout; copy them where call 2 finds them on this machine.
  mkdir -p "$WHEELS"
  find .whl -maxdepth 2 -type f \( -name '*.whl' -o -name '*.part?' \) -exec cp -f {} "$WHEELS"/ \; 2>/dev/null
  ls -la "$WHEELS"
}

install_stack() {
  # One pip call for every wheel: --target installs each top-level folder once, and the three
  # nvidia_cutlass_dsl wheels share one (a second call with --upgrade would replace it).
  set -e
  if [[ ! -f "$WHEELS/$LIBS_CU13" ]]; then
    if ! ls "$WHEELS/$LIBS_CU13".part0 "$WHEELS/$LIBS_CU13".part1 >/dev/null 2>&1; then
      echo "missing parts of $LIBS_CU13 in $WHEELS (part0 comes with call 1: was the machine" \
           "still warm?)"; ls -la "$WHEELS"; return 3
    fi
    cat "$WHEELS/$LIBS_CU13".part0 "$WHEELS/$LIBS_CU13".part1 >"$WHEELS/$LIBS_CU13"
  fi
  echo "$LIBS_CU13_SHA256  $WHEELS/$LIBS_CU13" | sha256sum -c -
  rm -rf "$SITE"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl
  ls "$SITE"
  ls "$SITE/nvidia_cutlass_dsl"
}

stack_env() {
  # pip --target skips the .pth that puts the CuTe DSL packages on sys.path: name them here.
  export PYTHONPATH="$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
  # On-disk compile caches, shared by the processes of calls 2 and 3.
  export FLEX_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLEX_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/cute_cache/flex
  export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/cute_cache/fa4
  export CUTE_DSL_CACHE_DIR=/tmp/cute_cache/dsl TVM_FFI_CACHE_DIR=/tmp/cute_cache/tvm_ffi
  mkdir -p /tmp/cute_cache/flex /tmp/cute_cache/fa4 /tmp/cute_cache/dsl /tmp/cute_cache/tvm_ffi
}

probe_stack() {
  $PY - <<'EOF'
import time, torch
t = time.time()
print("torch has __dlpack_c_exchange_api__:", hasattr(torch.Tensor, "__dlpack_c_exchange_api__"))
import tvm_ffi, cutlass
print("tvm_ffi", tvm_ffi.__version__, "cutlass", cutlass.__version__, f"{time.time() - t:.1f} s")
import cudnn, cudnn.flex_attention
print("cudnn frontend", getattr(cudnn, "__version__", "?"), "backend", cudnn.backend_version())
import flash_attn.cute
print("flash_attn.cute", flash_attn.cute.__version__, f"{time.time() - t:.1f} s")
from prefixlm.attention import AttentionInputs
from prefixlm.attention.backends import cudnn_flex
from prefixlm.bench.anchors import fa4_unavailable_reason
q = torch.zeros(1, 1, 128, dtype=torch.bfloat16, device="cuda")
print("cudnn_flex:", cudnn_flex.unavailable_reason(AttentionInputs.of(q, q, q)) or "available")
print("fa4 anchor:", fa4_unavailable_reason() or "available")
EOF
}

kernel_stats() {
  # Registers, spills and shared memory of each backward variant of the sweep, compiled for the
  # bench's case B shapes (the spill count is ptxas's: "dK/dV without spills" is read here).
  $PY - <<'EOF'
import importlib.util
import torch

from prefixlm.attention.backends import triton_kernels as kern
from prefixlm.attention.seqinfo import BatchMeta
from prefixlm.bench.spec import CASES, AttentionBatch
spec = importlib.util.spec_from_file_location("sweep", "bench/triton_sweep.py")
sweep = importlib.util.module_from_spec(spec); spec.loader.exec_module(sweep)
inp = AttentionBatch(CASES["B"], torch.device("cuda"))
meta = BatchMeta.from_info(inp.info)
scale = 128 ** -0.5
out, lse = kern.prefixlm_attention_fwd(inp.q, inp.k, inp.v, meta, scale)

def compiled(fn):
    found = {}
    for caches in fn.device_caches.values():
        found.update(caches[0])
    return found

print(f"{'variant':<58} {'kernel':<18} {'regs':>4} {'spills':>6} {'smem KB':>7}")
for cfg in sweep.parse_configs(sweep.DEFAULT_BWD, kern.BwdConfig):
    for det in (True, False):
        before = {n: set(compiled(getattr(kern, n))) for n in ("_bwd_dkdv_kernel", "_bwd_dq_kernel")}
        kern.prefixlm_attention_bwd(inp.dout, inp.q, inp.k, inp.v, out, lse, meta, scale, det, cfg)
        torch.cuda.synchronize()
        tag = (f"{'det' if det else 'fused' if cfg.atomic_dq else 'det'} n{cfg.kv_block_n} m{cfg.kv_block_m} "
               f"s{cfg.kv_stages} tma{int(cfg.use_tma)} dqtma{int(cfg.dq_tma)}")
        for name, seen in before.items():
            for key, k in compiled(getattr(kern, name)).items():
                if key not in seen:
                    print(f"{tag:<58} {name:<18} {k.n_regs:>4} {k.n_spills:>6} "
                          f"{k.metadata.shared / 1024:>7.1f}")
EOF
}

triton_tables() {
  echo; echo "== triton backward sweep, case A (ms, useful TFLOP/s, max |diff| to the first row)"
  sed -n '/^case A: ms/,/^=====/p' "$LOG" | grep -v '^=====' | head -n 16
  echo; echo "== dK/dV and dQ kernels: registers and spills"
  [[ -f "$OUT/kernel_stats.txt" ]] && cat "$OUT/kernel_stats.txt"
  echo; echo "== verify"
  for f in "$OUT"/verify_*.txt; do [[ -f "$f" ]] && echo "$(basename "$f"): $(grep -E 'passed, [0-9]+ failed' "$f" | tail -1)"; done
  for f in "$OUT"/verify_*.txt; do [[ -f "$f" ]] && grep -E 'FAIL' "$f" | head -5; done
}

pytest_tables() {
  for f in "$OUT"/pytest_*.txt; do
    [[ -f "$f" ]] || continue
    echo "$(basename "$f"): $(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$f" | tail -1)" \
         "$(grep -c ' PASSED' "$f") PASSED lines, $(grep -c ' FAILED' "$f") FAILED lines"
    grep -E '^FAILED' "$f" | head -8
  done
}

export CALL OUT PY WHEELS SITE LIBS_CU13 LIBS_CU13_SHA256
export -f stash_wheels install_stack probe_stack kernel_stats

case "$CALL" in
1)
  env_report
  step stash_wheels 5 stash_wheels
  step sweep 90 "$PY $SWEEP --case A --fwd '' --json $OUT/triton_sweep_bwd.json"
  step verify_fused 100 "$PY -m prefixlm verify --backend triton --max-len 2048 --nan-padding > $OUT/verify_triton_fused.txt"
  step verify_det 100 "$PY -m prefixlm verify --backend triton --max-len 2048 --nan-padding --deterministic > $OUT/verify_triton_deterministic.txt"
  step pytest_triton 60 "$PY -m pytest $TRITON_TESTS -m gpu -v -rfE -p no:cacheprovider > $OUT/pytest_triton_gpu.txt"
  step pytest_two_pass 60 "$PY -m pytest $TWO_PASS_TESTS -k gpu -v -rfE -p no:cacheprovider > $OUT/pytest_two_pass_gpu.txt"
  # Last: bench/triton_bwd_registers.py gives the same counts offline; this confirms them.
  step kernel_stats 30 "kernel_stats > $OUT/kernel_stats.txt"
  echo; echo "######## call 1 summary"; cat "$SUMMARY"
  triton_tables
  pytest_tables
  ;;
2|3)
  if [[ "$CALL" == 2 ]]; then
    : >"$PENDING"
    env_report
    step stash_wheels 5 stash_wheels
    step install 20 install_stack
  fi
  stack_env
  steps="${STEPS:-smoke bench_main verify_flex pytest_flex pytest_fa4 bench_rest}"
  if [[ "$CALL" == 3 ]]; then steps="${STEPS:-$(cat "$PENDING" 2>/dev/null)}"; fi
  step probe 20 probe_stack
  for s in $steps; do
    case "$s" in
      smoke) step smoke 60 "$PY -m pytest $FLEX_TESTS -m gpu -v -rfE -p no:cacheprovider -k 'gpu_matches_reference and edge_mix and mha and 128' > $OUT/pytest_smoke.txt" ;;
      # Every method in one process per case list; the issue's target cases first.
      bench_main) step bench_main 180 "$PY -m prefixlm bench attention --cases ${MAIN_CASES:-A,C,F,G} --json $OUT/attention_main.json" ;;
      bench_rest) step bench_rest 120 "$PY -m prefixlm bench attention --cases ${REST_CASES:-B,D,E} --json $OUT/attention_rest.json" ;;
      verify_flex) step verify_flex 120 "$PY -m prefixlm verify --backend cudnn_flex --max-len 2048 --nan-padding > $OUT/verify_cudnn_flex.txt" ;;
      pytest_flex) step pytest_flex 90 "$PY -m pytest $FLEX_TESTS -m gpu -v -rfE -p no:cacheprovider > $OUT/pytest_cudnn_flex_gpu.txt" ;;
      pytest_fa4) step pytest_fa4 45 "$PY -m pytest $ANCHOR_TESTS -m gpu -v -rfE -p no:cacheprovider > $OUT/pytest_fa4_gpu.txt" ;;
      *) note "[$s] unknown step" ;;
    esac
  done
  echo; echo "######## call $CALL summary"; cat "$SUMMARY"
  [[ -s "$PENDING" ]] && echo "left for call 3: $(tr '\n' ' ' <"$PENDING")"
  echo; echo "== bench attention (ms, useful TFLOP/s)"
  sed -n '/^| case | method | fwd/,$p' "$LOG" | grep -E '^\||^speed' | head -n 140
  # A bench cut by its deadline printed its records one by one: show those instead of a table.
  grep -q '^| case | method | fwd' "$LOG" || grep -E '^  [A-G] [a-z0-9_]+ +(fwd|fwd_bwd) ' "$LOG"
  grep -E 'cudnn_flex .*new plan' "$LOG" | head -n 14
  echo; echo "== verify"
  for f in "$OUT"/verify_*.txt; do [[ -f "$f" ]] && echo "$(basename "$f"): $(grep -E 'passed, [0-9]+ failed' "$f" | tail -1)"; done
  for f in "$OUT"/verify_*.txt; do [[ -f "$f" ]] && grep -E 'FAIL|skipped' "$f" | head -5; done
  pytest_tables
  ;;
*) echo "unknown call $CALL"; exit 2 ;;
esac

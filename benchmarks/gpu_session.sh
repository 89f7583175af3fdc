#!/usr/bin/env bash
# One prepared GPU session (H100 / H200, ~6 minutes): the GPU-only test, then the GPU benchmarks, most valuable
# first, each under its own time limit and all under one overall budget, so that one slow command (a long
# torch.compile) cannot eat the rest. Run from anywhere; it works in the repository root without installing the
# package (PYTHONPATH=.).
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh          # on the GPU machine ($OUT: where logs go)
#   GPU_SESSION_SMOKE=1 bash benchmarks/gpu_session.sh    # CPU check of every command: tiny models, --smoke
#
# Writes $OUT/<name>.log (stdout + stderr of each command) and $OUT/summary.txt (one line per command: status,
# exit code, seconds, elapsed session time, key figures parsed from the command's final JSON line).
#
# Environment knobs:
#   OUT                   output folder (default /tmp/gpu_session_out)
#   GPU_SESSION_BUDGET    seconds for the whole session (default 380); a command gets min(its cap, what is left)
#                         and is skipped if less than its minimum is left
#   GPU_SESSION_COMPILE   1 (default): torch.compile as in real training; 0: eager everywhere (no compile cost).
#                         A model whose gpu_throughput run times out (slow compilation) runs eager afterwards.
#   GPU_SESSION_SMOKE     1: the same commands on CPU with tiny models (checks arguments and imports only); also
#                         hides jsonargparse, which the GPU machine does not have
#   GPU_SESSION_NO_PYTEST 1: run the GPU test through the built-in fallback runner even if pytest is installed
#   PYTHON                interpreter (default: python, else python3)

cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
BUDGET=${GPU_SESSION_BUDGET:-380}
SMOKE=${GPU_SESSION_SMOKE:-0}
COMPILE=${GPU_SESSION_COMPILE:-1}
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3

export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Inductor's on-disk caches (default on in recent torch; explicit here): the second process compiling the same
# network (step_cost after gpu_throughput) reuses the first one's kernels instead of compiling again.
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1

if [ "$SMOKE" = 1 ]; then
    # jsonargparse is absent on the GPU machine: make any import of it fail here too.
    BLOCK=$(mktemp -d)
    mkdir -p "$BLOCK/jsonargparse"
    echo 'raise ImportError("jsonargparse is blocked: the GPU machine does not have it")' \
        >"$BLOCK/jsonargparse/__init__.py"
    export PYTHONPATH="$BLOCK:$PYTHONPATH" OMP_NUM_THREADS=1
    VIT=tiny-vit RN=tiny-resnet
    SIZE=()
    DEV=(--device cpu --precision bf16-mixed --smoke)
    PEAK=(--peak-flops 1e12)
    COMPILE=${GPU_SESSION_COMPILE:-0}  # inductor on CPU takes minutes; GPU_SESSION_COMPILE=1 checks that path
    # (in fp32: inductor's CPU C++ for a bf16 ViT failed to compile on the CPU box this was checked on)
    [ "$COMPILE" = 1 ] && DEV=(--device cpu --precision 32-true --smoke)
else
    VIT=vit_base_patch16_224 RN=resnet50
    SIZE=(--img-size 224 --batch-size 256)
    DEV=(--device cuda --precision bf16-mixed)
    PEAK=(--peak-flops 989e12)  # H200 = H100 SXM: 989 TFLOP/s dense bf16
fi
if [ "$COMPILE" = 1 ]; then
    COMPILE_FLAG=(--compile)
    THROUGHPUT_COMPILE=(--compile)
else
    COMPILE_FLAG=()
    THROUGHPUT_COMPILE=(--no-compile)
fi

note() { echo "$*" | tee -a "$SUMMARY"; }

# Key figures of a finished command: the final JSON line of a benchmark, the last line of pytest.
summarize() {
    "$PY" - "$1" <<'PYEOF' 2>/dev/null
import json, re, sys

lines = [l for l in open(sys.argv[1], errors="replace").read().splitlines() if l.strip()]
try:
    d = json.loads(lines[-1])
    kind = d["benchmark"]
except Exception:
    # No final JSON (failed or cut off): what finished, and the last error line.
    done = [l.strip() for l in lines if l.startswith(("  round ", "done "))]
    errors = [l.strip() for l in lines if re.match(r"[\w.]*(Error|Exception)\b", l.strip())]
    last = (errors[-1] if errors else lines[-1].strip() if lines else "(empty log)")[:200]
    parts = [f"{len(done)} fits/models finished, last: {done[-1][:300]}"] if done else []
    if not done or last != done[-1]:
        parts.append(last)
    print(" | ".join(parts))
    sys.exit()
out = []
if kind == "gpu_throughput":
    for r in d["results"]:
        mfu = f" MFU {r['mfu']:.1%}" if r.get("mfu") else ""
        syncs = f" syncs {r['host_syncs_per_step']:.1f}" if r.get("host_syncs_per_step") is not None else ""
        out.append(f"{r['variant']} {r['images_per_s']:.0f} img/s{mfu}{syncs}")
    for q in d["ratios"]:
        out.append(
            f"[{q['model']}] FLOP ratio {q['flop_ratio']:.3f} time ratio {q['masksub_over_baseline_time']:.3f} "
            f"gap {q['gap']:+.1%} Lightning/plain {q['lightning_over_plain_time']:.4f}"
        )
elif kind == "step_cost":
    for r in d["results"]:
        out.append(
            f"[{r['model']}] FLOP ratio {r['flop_ratio']:.3f} time ratio {r['time_ratio']:.3f} "
            f"[{r['time_ratio_q1']:.3f}, {r['time_ratio_q3']:.3f}] gap {r['gap']:+.1%} "
            f"fwd+bwd {r['compute_time_ratio']:.3f} base {r['baseline_step_s'] * 1e3:.1f} ms/step"
        )
elif kind == "memory":
    for r in d["results"]:
        out.append(
            f"[{r['model']}] peak ratio {r['peak_ratio']:.3f} (base {r['baseline_peak_mib']:.0f} MiB, "
            f"MaskSub {r['masksub_peak_mib']:.0f} MiB)"
        )
elif kind == "overhead":
    for r in d["results"]:
        extra = ""
        if r.get("ratio_without_logging") is not None:
            extra = f", w/o logging {r['ratio_without_logging']:.4f}"
        out.append(
            f"[{r['model']}] Lightning/plain {r['ratio']:.4f} ({r['overhead_ms']:+.2f} ms/step{extra}), "
            f"plain {r['plain_step_s'] * 1e3:.1f} ms/step"
        )
elif kind == "mfu_sweep":
    for r in d["best"]:
        mfu = f" MFU {r['mfu']:.1%}" if r.get("mfu") else ""
        out.append(f"[{r['family']} {r['variant']}] best: {r['setting']} {r['images_per_s']:.0f} img/s{mfu}")
    out.append(f"{len(d['results']) // 2} settings measured, {len(d['skipped'])} skipped")
print("; ".join(out))
PYEOF
}

# run NAME CAP MIN CMD...: run CMD with a limit of min(CAP, seconds left), or skip it if fewer than MIN are left.
run() {
    local name=$1 cap=$2 min=$3
    shift 3
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt "$min" ]; then
        note "$(printf '%-22s SKIPPED  %ds left < %ds needed' "$name" "$left" "$min")"
        LAST_STATUS=SKIPPED
        return
    fi
    local limit=$((cap < left ? cap : left))
    local start=$SECONDS
    {
        echo "\$ $*"
        echo "# limit ${limit}s, session time ${start}s"
    } >"$OUT/$name.log"
    timeout --kill-after=5 "$limit" "$@" >>"$OUT/$name.log" 2>&1
    local rc=$?
    local took=$((SECONDS - start)) status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status=TIMEOUT
    elif [ "$rc" -ne 0 ]; then
        status=FAILED
    fi
    note "$(printf '%-22s %-8s rc=%-3d %4ds (limit %4ds, at %4ds) | %s' \
        "$name" "$status" "$rc" "$took" "$limit" "$SECONDS" "$(summarize "$OUT/$name.log")")"
    LAST_STATUS=$status
    if [ "$status" = TIMEOUT ]; then
        # A process killed while compiling can leave a truncated file in inductor's cache (seen on CPU: a
        # zero-byte .so that broke every later compile of that kernel): later commands get fresh caches.
        TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
        TRITON_CACHE_DIR=$(mktemp -d)
        export TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR
        note "$(printf '%-22s (timed out: fresh compile caches from here on)' "$name")"
    fi
}

note "gpu_session: smoke=$SMOKE compile=$COMPILE budget=${BUDGET}s python=$PY $(date -u +%FT%TZ)" \
    "commit $(git log -1 --format=%h 2>/dev/null || echo unknown)"

# ---- 0. machine and software (a few seconds)
run nvidia_smi 20 0 bash -c "nvidia-smi && nvidia-smi --format=csv,noheader \
    --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit"
# First line: torch version and device name; then the other versions, and a check that the package, the
# benchmarks and the test helpers import without jsonargparse (absent on the GPU machine).
run versions 60 0 "$PY" -c "
import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')
import sys, importlib
for m in ('lightning', 'timm', 'torchmetrics', 'pytest', 'jsonargparse'):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, 'not importable:', type(e).__name__, e)
sys.modules.pop('jsonargparse', None)
sys.path[:0] = ['benchmarks', 'tests']
import masksub_lightning, _common, step_cost, memory, overhead, gpu_throughput, mfu_sweep, conftest
print('python', sys.version.split()[0], '| masksub_lightning imports; jsonargparse loaded:', 'jsonargparse' in sys.modules)
assert 'jsonargparse' not in sys.modules, 'the package or a benchmark imported jsonargparse'
"

# ---- 1. no host synchronisation inside training_step on the GPU (~30 s: two tiny fits, 6 steps each)
GPU_TEST_FALLBACK='
import sys, traceback, types
# pytest is not installed: a stand-in for the few pytest names the test module and conftest use.
class _Mark:
    def __getattr__(self, name):
        def mark(*args, **kwargs):
            if name == "parametrize":
                def parametrize(fn):
                    fn.cases = list(args[1])
                    return fn
                return parametrize
            return lambda fn: fn
        return mark
stub = types.ModuleType("pytest")
stub.mark = _Mark()
stub.fixture = lambda *args, **kwargs: (lambda fn: fn)
sys.modules["pytest"] = stub
sys.path[:0] = ["tests", "."]
import lightning as L, torch, test_gpu
if not torch.cuda.is_available():
    print("1 skipped (no CUDA device)")
    sys.exit(0)
failed = passed = 0
for name, fn in sorted(vars(test_gpu).items()):
    if not name.startswith("test_"):
        continue
    for case in getattr(fn, "cases", [()]):
        L.seed_everything(0, verbose=False)
        try:
            fn(*(case if isinstance(case, tuple) else (case,)))
            passed += 1
            print("PASSED", name, case[0] if case else "")
        except Exception:
            failed += 1
            traceback.print_exc()
            print("FAILED", name, case[0] if case else "")
print(f"{passed} passed, {failed} failed (fallback runner, no pytest)")
sys.exit(1 if failed else 0)
'
if [ "${GPU_SESSION_NO_PYTEST:-0}" != 1 ] && "$PY" -c "import pytest" >/dev/null 2>&1; then
    run gpu_tests 90 20 "$PY" -m pytest -m gpu tests/test_gpu.py -k "not recipe_smoke" -x -q -p no:cacheprovider
else
    run gpu_tests 90 20 "$PY" -c "$GPU_TEST_FALLBACK"
fi

# ---- 1b. recipe smoke (~1-3 min): 3 steps of each family in its recipe's precision: 16-mixed with a real
# GradScaler and clipping (Swin), bf16 + compile (DeiT-III), channels-last (RSB), layer decay + accumulation
# (fine-tunes), MAE and LUT pre-training.
if [ "${GPU_SESSION_NO_PYTEST:-0}" != 1 ] && "$PY" -c "import pytest" >/dev/null 2>&1; then
    run recipe_smoke 200 60 "$PY" -m pytest -m gpu tests/test_gpu.py -k recipe_smoke -q -p no:cacheprovider
fi

# ---- 1c. the GPU tests of the compute-skipping drop path (CUDA bf16 outputs, RNG stream) and of decode: gpu
# (nvJPEG pixels against the CPU path) (~30 s). A separate step: a failure here leaves step 1's result standing.
if [ "${GPU_SESSION_NO_PYTEST:-0}" != 1 ] && "$PY" -c "import pytest" >/dev/null 2>&1; then
    run gpu_tests_new 90 20 "$PY" -m pytest -m gpu tests/test_efficient_drop_path.py tests/data/test_gpu_decode.py \
        -q -p no:cacheprovider
fi

# A model whose throughput run timed out (compilation too slow) runs eager in steps 3 and 4.
VIT_COMPILE=("${COMPILE_FLAG[@]}")
RN_COMPILE=("${COMPILE_FLAG[@]}")

# ---- 2. images/s, MFU, MaskSub / baseline / plain loop, host syncs per step (bf16, fused AdamW, compiled).
# Estimate on an H100/H200: import ~10 s; compile ~60-90 s cold for ViT-B (main and sub-branch graphs, forward and
# backward), ~40-60 s for ResNet-50 (pixel masking keeps the input shape: one graph); then 2 rounds x 3 fits of
# 4 + 15 steps (~0.1-0.15 s per ViT-B step at batch 256) and 2 sync-count fits: ~25 s (ViT), ~15 s (ResNet).
run throughput_vit_b 190 60 "$PY" benchmarks/gpu_throughput.py --model $VIT "${SIZE[@]}" "${DEV[@]}" "${PEAK[@]}" \
    "${THROUGHPUT_COMPILE[@]}" --rounds 2 --warmup 4 --steps 15 --sync-debug
[ "$LAST_STATUS" = TIMEOUT ] && VIT_COMPILE=()
# (gpu_throughput: channels-last automatically for the CNN)
run throughput_resnet50 120 45 "$PY" benchmarks/gpu_throughput.py --model $RN "${SIZE[@]}" "${DEV[@]}" "${PEAK[@]}" \
    "${THROUGHPUT_COMPILE[@]}" --rounds 2 --warmup 4 --steps 15 --sync-debug
[ "$LAST_STATUS" = TIMEOUT ] && RN_COMPILE=()

# ---- 3. peak memory (eager, torch.cuda.max_memory_allocated; ~30 s for both models) and step cost (paired steps,
# compiled; the graphs come from inductor's cache filled above: ~40 s per model).
run memory 70 25 "$PY" benchmarks/memory.py --model $VIT --model $RN "${SIZE[@]}" --channels-last auto "${DEV[@]}" \
    --rounds 1 --warmup 2 --steps 1
run step_cost_vit_b 80 30 "$PY" benchmarks/step_cost.py --model $VIT "${SIZE[@]}" "${DEV[@]}" "${VIT_COMPILE[@]}" \
    --rounds 2 --warmup 2 --steps 6
run step_cost_resnet50 70 25 "$PY" benchmarks/step_cost.py --model $RN "${SIZE[@]}" --channels-last "${DEV[@]}" \
    "${RN_COMPILE[@]}" --rounds 2 --warmup 2 --steps 6

# ---- 4. if time is left: Lightning vs plain loop (window-timed fits), with the per-step logging ablation.
run overhead_vit_b 90 25 "$PY" benchmarks/overhead.py --model $VIT "${SIZE[@]}" "${DEV[@]}" "${VIT_COMPILE[@]}" \
    --fused-adamw --rounds 2 --warmup 3 --steps 12 --log-ablation

# ---- 5. if time is left (the default budget leaves none: GPU_SESSION_BUDGET=680 runs it too): the MFU sweep, one
# knob at a time from the reference (batch 512, compile modes, foreach AdamW, TF32 off, SDPA backends, channels-last
# off), baseline and MaskSub, each setting time-boxed; the sweep stops starting settings at its own --budget.
# Its compile settings are its own (GPU_SESSION_COMPILE does not apply).
SWEEP_BUDGET=$((BUDGET - SECONDS - 30))
[ "$SWEEP_BUDGET" -gt 270 ] && SWEEP_BUDGET=270
run mfu_sweep 300 120 "$PY" benchmarks/mfu_sweep.py --model $VIT --model $RN "${SIZE[@]}" "${DEV[@]}" "${PEAK[@]}" \
    --budget "$SWEEP_BUDGET"

note "gpu_session: done in ${SECONDS}s (budget ${BUDGET}s)"

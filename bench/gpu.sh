#!/usr/bin/env bash
# The GPU benchmarks of design §7 in one go, on a machine with one CUDA GPU: full SD2.1-base topology, random
# weights, 512 px, in fp16 and bf16 (a few minutes on an H100/H200-class card):
#   - bench/flipnet.py  plain SD2.1 step vs FlipNet + LQ cache vs joint batch (CFG batch 2), counted-FLOP ratio,
#                       gap, per-op profile of one step per case, LQ cache size, peak GPU memory;
#   - bench/dr2.py      DR2 latent and pixel refinement overhead per step vs the UNet step;
#   - bench/restore.py  seconds per 512 px face at 20 steps (FlipNet restore with the LQ cache; DR2 latent and
#                       pixel space, 20 UNet evaluations) and peak GPU memory (torch.cuda.max_memory_allocated);
#   - bench/clrface.py  CLR-Face guided Heun step (UNet + VAE decode fwd/bwd + iresnet r50 fwd/bwd per model call)
#                       vs unguided step, each part timed, counted FLOPs, the guide-every-k-th-step budget, the
#                       template-window decode and peak GPU memory per variant.
# Each writes <name>_<dtype>.json and .log into RESULTS_DIR/raw; bench/gpu_report.py then writes results.json
# (every run's JSON, return codes, machine) and results.md (the tables for BENCHMARKS.md), and raw/ is packed into
# raw.tar.gz: three files in all (the device tool brings back at most 8).
#
# Usage, from anywhere:
#   bench/gpu.sh [RESULTS_DIR]              default: $OUT if set, else bench/results/gpu-<date>
#   bench/gpu.sh --cpu-dry-run [RESULTS_DIR] the same sequence on the CPU at 64 px, 1 repeat, 2 steps (checks the
#                                            plumbing, not a benchmark)
# Environment: PYTHON (default: the checkout's .venv/bin/python, else python3), REPEATS (GPU: 20), DTYPES (GPU:
# "fp16 bf16"; dry run: "fp32 bf16"), STEP_TIMEOUT (seconds per script, default 600).
# Needs torch with CUDA, diffusers, transformers and this checkout importable as comfyui_bfr (installed, or else the
# script points PYTHONPATH at the checkout through a symlink named comfyui_bfr in a temporary folder).
# Without a CUDA device it runs nothing, says so and exits 0.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
DRY=0
if [ "${1:-}" = "--cpu-dry-run" ]; then DRY=1; shift; fi
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONUNBUFFERED=1

if [ "$DRY" = 0 ]; then
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "bench/gpu.sh: no CUDA device visible to $PY ($("$PY" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null || echo 'torch not importable')); nothing was run."
        exit 0
    fi
    DEV=cuda; SIZE=512; STEPS=20; REPEATS="${REPEATS:-20}"; DTYPES="${DTYPES:-fp16 bf16}"; THREADS=4; CLR_EXTRA=()
else
    # the dry run skips clrface.py's CPU peak-memory child processes (CUDA measures in-process)
    DEV=cpu; SIZE=64; STEPS=2; REPEATS=1; DTYPES="${DTYPES:-fp32 bf16}"; THREADS=2; CLR_EXTRA=(--no-memory)
fi
RESULTS="${1:-${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}}"
RAW="$RESULTS/raw"
mkdir -p "$RAW" || exit 2

# the pack: installed, or this checkout under the name comfyui_bfr
if ! "$PY" -c 'import comfyui_bfr' 2>/dev/null; then
    LINKS="$(mktemp -d)"
    ln -s "$ROOT" "$LINKS/comfyui_bfr"
    export PYTHONPATH="$LINKS${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! missing="$("$PY" - <<'EOF' 2>&1
import importlib
bad = []
for name in ("torch", "diffusers", "transformers", "comfyui_bfr.lora.boosthub", "comfyui_bfr.pipelines.flipnet",
             "comfyui_bfr.pipelines.dr2", "comfyui_bfr.pipelines.clrface"):
    try:
        importlib.import_module(name)
    except Exception as exc:  # report every missing piece at once
        bad.append(f"{name} ({type(exc).__name__}: {exc})")
if bad:
    raise SystemExit("cannot import " + "; ".join(bad))
EOF
)"; then
    echo "bench/gpu.sh: $missing. Install the pack's dependencies for $PY (diffusers, transformers; see pyproject.toml) and rerun." | tee "$RESULTS/ERROR.txt"
    exit 2
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (+ local changes)')"
    echo "python: $("$PY" -c 'import sys, torch, diffusers; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__)')"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
    fi
    echo "mode: $([ "$DRY" = 1 ] && echo 'cpu dry run (64 px, not a benchmark)' || echo gpu) device=$DEV size=$SIZE steps=$STEPS repeats=$REPEATS dtypes=$DTYPES"
} > "$RAW/machine.txt"
cat "$RAW/machine.txt"

STATUS="$RAW/status.txt"
: > "$STATUS"
run() {  # name, then the command; the rc goes to status.txt (1 from flipnet/dr2 = target not met: a result)
    local name="$1"; shift
    echo "== $name: $*"
    local t0=$SECONDS
    timeout "${STEP_TIMEOUT:-600}" "$@" 2>&1 | tee "$RAW/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$STATUS"
}

for dt in $DTYPES; do
    run "flipnet_$dt" "$PY" bench/flipnet.py --device "$DEV" --dtype "$dt" --size "$SIZE" --repeats "$REPEATS" \
        --threads "$THREADS" --profile --json "$RAW/flipnet_$dt.json"
    run "dr2_$dt" "$PY" bench/dr2.py --device "$DEV" --dtype "$dt" --size "$SIZE" --repeats "$REPEATS" \
        --threads "$THREADS" --json "$RAW/dr2_$dt.json"
    run "restore_$dt" "$PY" bench/restore.py --device "$DEV" --dtype "$dt" --size "$SIZE" --steps "$STEPS" \
        --threads "$THREADS" --cases flipnet,dr2-latent,dr2-pixel --json "$RAW/restore_$dt.json"
    run "clrface_$dt" "$PY" bench/clrface.py --device "$DEV" --dtype "$dt" --size "$SIZE" --repeats "$REPEATS" \
        --threads "$THREADS" ${CLR_EXTRA[@]+"${CLR_EXTRA[@]}"} --json "$RAW/clrface_$dt.json"
done
"$PY" bench/gpu_report.py "$RAW" "$RESULTS"
report_rc=$?
tar czf "$RESULTS/raw.tar.gz" -C "$RESULTS" raw && rm -rf "$RAW"
echo "results in $RESULTS: results.md, results.json, raw.tar.gz (each run's .json and .log)"
exit $report_rc

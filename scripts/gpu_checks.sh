#!/usr/bin/env bash
# The GPU checks of issue 11 in one run, for a lent machine with a short time budget: each step
# has its own time limit and writes its log to $OUT (or ./gpu-logs), so a slow step costs only
# its own share. Missing wheels (soundfile, soxr, cffi, pycparser) travel in .whl/.
#
#   bash scripts/gpu_checks.sh [TOTAL_SECONDS]
#
# 1. extraction throughput, compile apart, XLA's GPU autotuning on (default) and off
#    (--xla_gpu_autotune_level=0): bench_scale.py, two random base-size models, 600 s of speech;
# 2. the paper grid: the statistics update at full width and the metric stage (bench_paper_grid);
# 3. analyze against forward-only on the GPU (bench_pipeline.py);
# 4. whatever time is left: the model parity tests against transformers.
set -u
total=${1:-560}
out=${OUT:-gpu-logs}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 SSLSIM_CACHE_DIR=none
left() { echo $((total - SECONDS)); }
step() {  # step NAME SECONDS COMMAND...: runs COMMAND for at most SECONDS (or what is left)
    local name=$1 limit=$2
    shift 2
    ((limit > $(left))) && limit=$(left)
    if ((limit < 20)); then
        echo "## $name: skipped, ${limit} s left" | tee -a "$out/summary.log"
        return
    fi
    echo "## $name (limit ${limit} s, at ${SECONDS} s)" | tee -a "$out/summary.log"
    timeout -k 5 "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep -v "^WARNING" | tail -40
    echo "## $name: rc ${PIPESTATUS[0]} at ${SECONDS} s" | tee -a "$out/summary.log"
}
nvidia-smi -L
python3 -c "import jax, flax, transformers; print(jax.__version__, flax.__version__, \
transformers.__version__, jax.devices())"
cd scripts || exit 1
step extract 110 python3 bench_scale.py --size base --devices 1 --tile-seconds 600 \
    --batch-seconds 80
XLA_FLAGS=--xla_gpu_autotune_level=0 step extract_noautotune 110 python3 bench_scale.py \
    --size base --devices 1 --tile-seconds 600 --batch-seconds 80
step paper_grid 170 python3 bench_paper_grid.py --frames 1000 --k 16 32 --n 8192 --repeats 1
step pipeline 150 python3 bench_pipeline.py --seconds 300 --cases forward linear_cka default
cd .. || exit 1
step parity 120 python3 -m pytest -x -q -p no:cacheprovider tests/test_models.py -k "not slow"

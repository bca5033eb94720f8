#!/usr/bin/env bash
# The GPU measurements in the README, in one go (about 10 minutes on an H100; not run since the
# batched decoding and the labelled-positions head were added: no GPU was lent that session):
#   bash benchmarks/gpu.sh            # writes gpu.txt to $OUT (or the current directory)
# SIZE, DEVICE and PY let it be tried on a CPU at a tiny size first:
#   SIZE=tiny DEVICE=cpu PY=.venv/bin/python bash benchmarks/gpu.sh
set -u
SIZE=${SIZE:-llama-2-7b}; DEVICE=${DEVICE:-cuda}; PY=${PY:-python3}; OUT=${OUT:-.}
export PYTHONUNBUFFERED=1
log="$OUT/gpu.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} | tee "$log"
bench() {  # limit in seconds, then bench.py's flags
  local limit=$1; shift
  echo "\$ python bench.py --device $DEVICE --size $SIZE --batch 8 --seq 512 $*" | tee -a "$log"
  timeout "$limit" $PY bench.py --device "$DEVICE" --size "$SIZE" --batch 8 --seq 512 "$@" 2>&1 \
    | grep -v -i -E "warn|^ *$" | tee -a "$log"
}
bench 200 --rounds 2 --steps 3 --new-tokens 64
bench 90 --no-peer --attention einsum --rounds 1 --steps 3 --new-tokens 32
bench 90 --no-peer --activation-checkpointing --rounds 1 --steps 2 --new-tokens 8 --gen-batch 1
bench 300 --no-peer --compile --rounds 1 --steps 3 --new-tokens 128
bench 120 --no-peer --quantize nf4 --activation-checkpointing --rounds 1 --steps 2 --new-tokens 8 --gen-batch 1
bench 120 --no-peer --quantize int8 --activation-checkpointing --rounds 1 --steps 2 --new-tokens 8 --gen-batch 1
SIZE=llama-2-13b bench 180 --no-peer --quantize nf4 --activation-checkpointing --rounds 1 --steps 2 --new-tokens 8 --gen-batch 1

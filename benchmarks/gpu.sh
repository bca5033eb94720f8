#!/usr/bin/env bash
# The GPU measurements in the README, in one go (about 8 minutes on an H100):
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
bench 150 --sdpa --rounds 2 --steps 3 --new-tokens 64
bench 60 --no-peer --rounds 1 --steps 3 --new-tokens 32
bench 60 --no-peer --sdpa --activation-checkpointing --rounds 1 --steps 2 --new-tokens 8
bench 200 --no-peer --sdpa --compile --rounds 1 --steps 3 --new-tokens 128

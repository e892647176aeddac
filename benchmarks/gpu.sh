#!/bin/bash
# The harness on a lent GPU machine (the `device` tool's `run`), as one prepared command:
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=540)
# That machine has torch (2.11 at the last reading), numpy, pyyaml, tqdm, matplotlib, safetensors and
# transformers but no pydantic: its wheels travel in .whl/ (ignored by git; fetch them here with
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic pydantic-core annotated-types typing-inspection
# ). Results land in $OUT (the tool brings them back); the cases are the issue's reference rows plus
# tspd's own recipes, timed with torch.cuda.synchronize() around every step.
# Locally, without a GPU, `DEVICE=cpu OUT=/tmp/x bash benchmarks/gpu.sh` runs the same steps on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tspd-gpu}; DEVICE=${DEVICE:-cuda}; STEPS=${STEPS:-20}
mkdir -p "$OUT"
PY=${PY:-python3}
if ! $PY -c "import pydantic" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu.sh: no pydantic and no .whl/ to install it from (see the header)"; exit 2; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  [ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} 2>&1 | tee "$OUT/env.txt"
cases=${CASES:-tms-5-2,induction-recipe,induction-shared-64,induction-shared-256,induction-vector-64,induction-vector-256,induction-qkvo-256,tiny-gpt2-fp32,tiny-gpt2-bf16}
$PY -m benchmarks --device "$DEVICE" --cases "$cases" --steps "$STEPS" --warmup 5 --out "$OUT/bench-$DEVICE.json" 2>&1 | tee "$OUT/bench-$DEVICE.log"

#!/usr/bin/env bash
# Every GPU check in one call, sized for about 9 minutes on one H100 / H200 (no internet there):
#   1. the environment: GPU, driver, torch / torchvision / timm versions, what imports;
#   2. the tests that need CUDA (those that skip without it run here for real);
#   3. eager ours/peer at batch 1 and 64, float32 (speed.py --only eager);
#   4. deploy (BN folded, channels-last, compiled) against the peer's eager float32 model,
#      float32 / bfloat16 / float16, at batch 64, for resnet50 and wide_resnet50_2 (each compile
#      takes tens of seconds, so not all five nets);
#   5. one training step at batch 64 (speed.py --only train), and the CIFAR nets (--only cifar).
# Each step has its own time limit, so a slow one costs its own result only. Results go to
# $OUT (the device tool brings that folder back), or to benchmarks/results/ when $OUT is unset:
#   speed_cuda.json (speed.py's format), gpu_check.log (everything printed).
# Run from the repository root:  bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
log="$out/gpu_check.log"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's package, not an installed one
json="$out/speed_cuda.json"
[ -f benchmarks/results/speed_cuda.json ] && [ ! -f "$json" ] && cp benchmarks/results/speed_cuda.json "$json"

step() {  # step SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2
    shift 2
    echo "=== $what (limit ${limit}s): $*" | tee -a "$log"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v "No CUDA runtime" | tee -a "$log"
    echo "=== $what: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$log"
}

step 30 environment bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  python -c "import torch, torchvision; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda,
  \"torchvision\", torchvision.__version__, \"bf16\", torch.cuda.is_bf16_supported())";
  python -c "import timm; print(\"timm\", timm.__version__)";
  python -c "import resnets; print(\"resnets imports\")"'
step 90 "tests on CUDA" python -m pytest -q -x -m "gpu" -p no:cacheprovider tests
step 120 "eager ours/peer" python benchmarks/speed.py --device cuda --only eager --quick --batches 1 64 --out "$json"
step 180 "deploy vs peer eager" python benchmarks/speed.py --device cuda --only deploy --quick --batches 64 \
    --nets resnet50 wide_resnet50_2 --out "$json"
step 60 "train step" python benchmarks/speed.py --device cuda --only train --quick --dtypes float32 --out "$json"
step 100 "CIFAR nets" python benchmarks/speed.py --device cuda --only cifar --quick --dtypes float32 bfloat16 \
    --out "$json"
echo "results: $json, log: $log"

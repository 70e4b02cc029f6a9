#!/usr/bin/env bash
# The papers' own CIFAR-10 recipes on one GPU (He et al. 2015, Table 6: 164 epochs, lr 0.1 divided
# by 10 at epochs 82 and 123): configs/cifar10_resnet20.toml, then configs/cifar10_resnet56.toml,
# each with its own time limit, the speed settings left to auto. Needs the CIFAR-10 JPEG archive at
# data/cifar10-jpeg.tar.gz (git-ignored; the device tool's `carry` brings it). Each run's folder
# (config.toml, metrics.csv, summary.json, curves.png) goes to $OUT/paper_<model>, or runs/ when
# $OUT is unset; a run cut by its limit still leaves its metrics.csv of the epochs done.
# Run from the repository root:  bash benchmarks/gpu_train_paper.sh [SECONDS_PER_RUN]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs}
limit=${1:-420}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out" data
[ -d data/cifar10-jpeg ] || tar xzf data/cifar10-jpeg.tar.gz -C data
for model in resnet20 resnet56; do
    t0=$SECONDS
    timeout "$limit" python -m resnets train --config "configs/cifar10_$model.toml" --data-dir data/cifar10-jpeg \
        --out "$out/paper_$model" --quiet --ckpt-every 1000 2>&1 | grep -v "No CUDA runtime" | tee "$out/paper_$model.log"
    echo "=== $model: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$out/paper_$model.log"
    rm -f "$out/paper_$model"/*.ckpt "$out/paper_$model"/*.safetensors  # only the small files travel back
done

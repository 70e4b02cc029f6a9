#!/usr/bin/env bash
# The paper-scale versions of two studies in docs/findings.md, for one GPU, as a queue that a
# series of short calls works through:
#   1. degradation (He et al. 2015, Fig. 6) at the paper's schedule (`--full`: 164 epochs = 64k
#      iterations of 128, lr / 10 at epochs 82 and 123): resnet20, resnet56, plain20, plain56,
#      seed 0, then the same at seed 1;
#   2. the five residual units at ResNet-110 (He et al. 2016, Table 2: `ablation units --model
#      resnet110 --full`), seeds 0, 1, 2.
# Each run is trained once: finished runs are read back from their small files (config.toml,
# metrics.csv, summary.json), kept under docs/results/gpu_studies/ in the layout of the studies'
# --out folders and copied in first; a run cut by the time limit resumes from the checkpoint the
# last call brought back (runs/gpu_studies_resume.tar, git-ignored, carried).
# The queue stops after SECONDS (default 480; SIGTERM, so the run in progress writes last.ckpt) and
# leaves in $OUT (or runs/ when $OUT is unset):
#   gpu_studies.tar.gz          every finished run's small files and the studies' JSON and PNG:
#                               tar xzf it in docs/results/gpu_studies/ and commit;
#   gpu_studies_resume.tar      the checkpoint of the run that was cut (copy to runs/ and carry);
#   gpu_studies.log             everything printed.
# Needs data/cifar10-jpeg.tar.gz (git-ignored; carry it).
# Run from the repository root:  bash benchmarks/gpu_studies.sh [SECONDS]
# A smoke run here (no GPU): STUDY_ARGS="--epochs 1" DATA_DIR=<a small CIFAR-style image tree>.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs}
limit=${1:-480}
work=${WORK:-runs/gpu_studies}
log="$out/gpu_studies.log"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's package, not an installed one
mkdir -p "$out" "$work" data
data_dir=${DATA_DIR:-data/cifar10-jpeg}
[ -d "$data_dir" ] || tar xzf data/cifar10-jpeg.tar.gz -C data
results=${RESULTS:-docs/results/gpu_studies}  # finished runs, read back
resume=${RESUME:-runs/gpu_studies_resume.tar}  # the run the last call cut
[ -d "$results" ] && cp -r "$results/." "$work/"
[ -f "$resume" ] && tar xf "$resume" -C "$work"
# STUDY_ARGS replaces --full (a smoke run of the queue on a small budget)
read -r -a full <<< "${STUDY_ARGS:---full}"
deadline=$((SECONDS + limit))

queue() {  # queue DESCRIPTION COMMAND...: run it in the time left, or skip it when none is
    local left=$((deadline - SECONDS)) what=$1
    shift
    if ((left < 30)); then
        echo "=== $what: skipped, no time left" | tee -a "$log"
        return 1
    fi
    echo "=== $what (${left}s left): $*" | tee -a "$log"
    timeout -k 60 "$left" "$@" 2>&1 | grep -v "No CUDA runtime" | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== $what: exit $rc at ${SECONDS}s" | tee -a "$log"
    [ "$rc" -eq 0 ]
}

{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  python -c "import torch; print('torch', torch.__version__)"; } | tee -a "$log"
for seed in 0 1; do
    queue "degradation, seed $seed" python -m resnets analyze degradation "${full[@]}" \
        --model resnet20 resnet56 plain20 plain56 --data-dir "$data_dir" \
        --out "$work/degradation_full/seed_$seed" --seed "$seed" || break
done
queue "units at 110 layers" python -m resnets analyze ablation units --model resnet110 "${full[@]}" \
    --seeds 0 1 2 --data-dir "$data_dir" --out "$work/units110"

# A run is finished when it has a summary.json (the trainer writes it last); it travels as its small
# files. A run with a last.ckpt and no summary.json was cut: its folder travels whole (config.toml,
# metrics.csv and the checkpoint that resumes it).
(
    cd "$work" || exit
    find . -name summary.json | while read -r s; do
        d=$(dirname "$s")
        printf '%s\n' "$d/config.toml" "$d/metrics.csv" "$s"
    done
    find . -maxdepth 3 \( -name '*.json' -o -name '*.png' \) -not -path '*_runs/*'
) | sort -u > "$work/.small"
tar czf "$out/gpu_studies.tar.gz" -C "$work" -T "$work/.small"
(cd "$work" && find . -name last.ckpt | while read -r c; do
    d=$(dirname "$c")
    [ -f "$d/summary.json" ] || printf '%s\n' "$d"
done) > "$work/.cut"
rm -f "$out/gpu_studies_resume.tar"
[ -s "$work/.cut" ] && tar cf "$out/gpu_studies_resume.tar" -C "$work" --exclude=model.safetensors -T "$work/.cut"
echo "finished runs: $(grep -c summary.json "$work/.small"); cut: $(wc -l < "$work/.cut")" | tee -a "$log"
ls -l "$out"

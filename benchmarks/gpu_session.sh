#!/usr/bin/env bash
# One GPU session of the issue "GPU speed and scaling", as four back-to-back device calls
# (each under the 10-minute call limit and the 64 MiB transfer limit; the machine must stay
# warm between them, so nothing else runs in between). Results go to $OUT.
#
#   call 1, carry .devbundle:         bash benchmarks/gpu_session.sh step
#   call 2, carry .bdmdata:           bash benchmarks/gpu_session.sh scaling [GPUS] [MODES]
#     (on a 4-GPU host: scaling 1,2,4 qat, then scaling 1,2,4 teacher, one call each)
#   call 3, carry .bdmfid/part00:     bash benchmarks/gpu_session.sh fidpart
#     (a study-only session starts with: carry .devbundle and .bdmdata: ... data)
#   call 4, carry .bdmfid/part01:     bash benchmarks/gpu_session.sh study [inline|train]
#     (inline, the default: each trial's loop runs in its Tune trial actor; train: each
#     trial is a Ray Train fit, as in sessions 2 and 3)
#
# A machine idle for over 30 s goes back; then the next call must carry .devbundle too.
# .devbundle comes from ../shared/tools/device-bundle, .bdmdata and .bdmfid from
# benchmarks/device_payload.py (see benchmarks/results/gpu_perf.md, "Rerunning").
# Carried folders can vanish in a later call, so what each call needs later is copied
# to /tmp (kept while the machine is held); setup.sh installs the bundle into /tmp once.
set -eo pipefail
stage="$1"
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT" /tmp/bdmcache
# setup.sh reads the bundle only on its first run on a machine; later calls use a copy.
[ -f .devbundle/setup.sh ] && cp .devbundle/setup.sh /tmp/bdm-setup.sh
# shellcheck disable=SC1091
source /tmp/bdm-setup.sh
export TORCH_HOME=/tmp/th BINARYDM_CACHE_DIR=/tmp/bdmcache BINARYDM_DATA_ROOT=/tmp/.bdmdata
export PYTHONUNBUFFERED=1
weights="$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth"

case "$stage" in
step)
    nvidia-smi -L | tee "$OUT/gpus.txt"
    nproc >>"$OUT/gpus.txt"
    # fp eager is the baseline of the table; -cg = torch.compile(mode="reduce-overhead").
    timeout 560 python3 benchmarks/gpu_qat_step.py --steps 20 --sample-batch 0 \
        --variants fp,fp-cg,bdm-cg,fp-cg-fused,bdm-cg-fused,bdm-compiled \
        --profile fp-cg,bdm-cg --profile-out "$OUT/profile.md" --json "$OUT/step.json" \
        2>&1 | tee "$OUT/step.log" || true
    ;;
scaling)
    # Optional: worker counts and modes (a 4-GPU host needs two calls: qat, then teacher).
    gpus="${2:-1,2}"
    modes="${3:-qat,teacher}"
    [ -d .bdmdata ] && cp -r .bdmdata /tmp/
    nvidia-smi topo -m >"$OUT/topology.txt" 2>&1 || true
    timeout 570 python3 benchmarks/gpu_scaling.py --gpus "$gpus" --modes "$modes" \
        --steps 150 --log-every 25 --data-root /tmp/.bdmdata --workdir /tmp/scal \
        --json "$OUT/scaling-${modes//,/-}.json" 2>&1 | tee "$OUT/scaling-${modes//,/-}.log" || true
    ;;
data)
    # Only stage the data and name the machine (the study's first call).
    nvidia-smi -L | tee "$OUT/gpus.txt"
    nproc >>"$OUT/gpus.txt"
    cp -r .bdmdata /tmp/
    ;;
fidpart)
    mkdir -p /tmp/fidparts && cp .bdmfid/part00 /tmp/fidparts/
    ;;
study)
    mkdir -p "$(dirname "$weights")"
    cat /tmp/fidparts/part00 .bdmfid/part01 >"$weights"
    sha256sum "$weights" | tee "$OUT/weights.sha256"
    runner="${2:-inline}"
    inline=false
    [ "$runner" = inline ] && inline=true
    # 8 trials in one wave on a 2-GPU host: 4 per card (0.25 GPU, 2 CPUs each).
    timeout 540 python3 benchmarks/study_overhead.py benchmarks/studies/gpu_overhead.yaml \
        --workdir "/tmp/study-$runner" --json "$OUT/study-$runner.json" \
        --set "workers.inline=$inline" \
        --set workers.gpus_per_worker=0.25 --set workers.cpus_per_worker=2 \
        --set resources.max_concurrent_trials=8 --set training.steps=150 \
        --set training.checkpoint_every=150 2>&1 | tee -a "$OUT/study-$runner.log" || true
    ;;
*)
    echo "usage: $0 step|scaling|data|fidpart|study" >&2
    exit 2
    ;;
esac

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
#   call 4, carry .bdmfid/part01:     bash benchmarks/gpu_session.sh study [inline|train] [TRIALS] [STEPS]
#     (then, in the same command: bash benchmarks/gpu_session.sh startup)
#     (inline, the default: each trial's loop runs in its Tune trial actor; train: each
#     trial is a Ray Train fit, as in sessions 2 and 3; TRIALS 8, STEPS 150 by default,
#     on a 4-GPU host: study inline 16 300)
#   sampling (carry .devbundle; after a study call for the FID part): bash benchmarks/gpu_session.sh sampling
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
    # Assembled from the call that carries the second half; a second study on the warm
    # machine carries no part and finds the weights in place.
    if [ -f .bdmfid/part01 ]; then
        cat /tmp/fidparts/part00 .bdmfid/part01 >"$weights.part" && mv "$weights.part" "$weights"
    fi
    sha256sum "$weights" | tee "$OUT/weights.sha256"
    # benchmarks/device_payload.py's conversion is deterministic: anything else is a bad copy.
    grep -q '^f91d46f51c1d0e89ac64aca12f454bffa6bbd67c98b3e38a9325073e58bcce4c ' "$OUT/weights.sha256" ||
        { echo "FID weights at $weights are not the converted file: carry both halves again" >&2; exit 1; }
    runner="${2:-inline}"
    # Trials (all in one wave: 4 per card at 0.25 GPU and 2 CPUs each) and QAT steps:
    # 8 and 150 on a 2-GPU host (session 5), 16 and 300 on a 4-GPU host (session 6).
    trials="${3:-8}"
    steps="${4:-150}"
    inline=false
    [ "$runner" = inline ] && inline=true
    name="study-$runner-$trials-$steps"
    timeout 560 python3 benchmarks/study_overhead.py benchmarks/studies/gpu_overhead.yaml \
        --workdir "/tmp/$name" --json "$OUT/$name.json" \
        --set "workers.inline=$inline" \
        --set workers.gpus_per_worker=0.25 --set workers.cpus_per_worker=2 \
        --set "search.trials=$trials" --set "resources.max_concurrent_trials=$trials" \
        --set "training.steps=$steps" --set "training.checkpoint_every=$steps" \
        2>&1 | tee -a "$OUT/$name.log" || true
    ;;
sampling)
    # Issue 18's sampling: eager vs compiled denoising steps (W1A4 and FP) and the FID pass
    # (needs the weights assembled by a study call first; skipped, and said so, without).
    nvidia-smi -L | tee "$OUT/gpus.txt"
    timeout 290 python3 benchmarks/gpu_sampling.py --json "$OUT/sampling.json" \
        2>&1 | tee "$OUT/sampling.log" || true
    ;;
startup)
    # After a study on this machine (its teacher is cached): a trial's start-up stages in
    # 1 process, then in 8 started together (a first wave of 8 trials on 2 GPUs).
    teacher="$(ls -d /tmp/bdmcache/teachers/*/ | head -1)"
    for n in 1 8; do
        timeout 200 python3 benchmarks/trial_startup.py benchmarks/studies/gpu_overhead.yaml \
            --teacher "$teacher" --processes "$n" --data-root /tmp/.bdmdata \
            --json "$OUT/startup-$n.json" 2>&1 | tail -40 | tee -a "$OUT/startup.log" || true
    done
    ;;
*)
    echo "usage: $0 step|scaling|data|fidpart|study|sampling|startup" >&2
    exit 2
    ;;
esac

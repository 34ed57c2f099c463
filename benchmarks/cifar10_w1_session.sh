#!/usr/bin/env bash
# One GPU session of the CIFAR-10 results (benchmarks/results/cifar10_w1.md) on one H200,
# as back-to-back device calls: the payload (bundle, FID weights, the shared teacher, the
# full CIFAR-10 copy) travels in parts, then a smoke run, then the study in the background,
# polled until it ends; its MLflow store, Optuna storage and log come back in $OUT.
#
# Here, once (the bundle at pyproject's pins: by default it takes the registry's newest
# MLflow and Optuna, and a store written by MLflow 3.18.0 could not be read by the pinned
# 3.17.2 here, session 6, 2026-12-02):
#   ../shared/tools/device-bundle 'ray[default,tune,train]==2.60.0' optuna==5.0.0 \
#       mlflow-skinny==3.17.2 diffusers==0.42.1 pytorch-fid==0.3.0
#   # (a part plus the tracked tree must stay under the 64 MiB a call carries: 56 MiB
#   # parts with the 4.7 MB tree of 2026-12-02; 61 MiB was refused)
#   python benchmarks/device_payload.py pack --out .bdmpayload --part-mib 56 \
#       --item .devbundle=.devbundle --item fid.pth=$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth \
#       --item teacher=../shared/teachers/ddpm-cifar10-jpeg \
#       --item data/cifar10_jpeg_bytes.npz=../shared/data/cifar10_jpeg_bytes.npz
# Device calls (carry the one part; the last also carries .bdmpayload/manifest.json):
#   bash benchmarks/cifar10_w1_session.sh part 00          # ... one call per part (one
#                                                          # tool batch: no gaps)
#   bash benchmarks/cifar10_w1_session.sh unpack           # join, check, install, smoke run (SMOKE=0: none)
#   bash benchmarks/cifar10_w1_session.sh start STUDY NAME [--set KEY=VALUE ...]
#                                                          # (again for a second study
#                                                          # at once: each its own Ray)
#   bash benchmarks/cifar10_w1_session.sh job NAME CMD...  # a benchmark beside it (writes
#                                                          # /tmp/run/NAME/*.json)
#   bash benchmarks/cifar10_w1_session.sh poll SECONDS     # repeat until it reports "done"
#   bash benchmarks/cifar10_w1_session.sh stop NAME        # end a study as a lost machine would
# A study longer than one session (stage 3) continues in the next: its last poll's
# NAME-stores.tgz (MLflow, Optuna, Ray Tune's experiment; no checkpoints, no packed
# models) is copied to .bdmpayload/NAME-stores.tgz here and carried with the unpack call:
#   bash benchmarks/cifar10_w1_session.sh restore NAME     # at the same path as before
#   bash benchmarks/cifar10_w1_session.sh start STUDY NAME --resume [the same --set ...]
# (a trial cut off at the end of a session trains again from step 0, a new attempt of
# its run: tests/fault/test_driver_faults.py, ..._without_the_checkpoints).
# Where the stores did not survive on this side either (a new checkout: only what was
# committed is there), the study's run archive is the record: export it after each
# session (docs/run-archive.md; with --optuna-storage it carries the Optuna trials),
# commit it, and start the next session from it instead of `restore`:
#   rm -r benchmarks/results/runs/NAME                     # export refuses a full folder
#   bdm-search export NAME --out benchmarks/results/runs/NAME --tracking-uri \
#       sqlite:///DIR/mlflow.db --artifacts-from DIR/mlartifacts --optuna-storage \
#       sqlite:///DIR/optuna.db                            # here, DIR = the stores untarred
#   python benchmarks/run_index.py benchmarks/results/runs --out \
#       benchmarks/results/runs/README.md                  # the index (a test checks it)
#   bash benchmarks/cifar10_w1_session.sh import NAME      # there, in the unpack call
#   bash benchmarks/cifar10_w1_session.sh start STUDY NAME --resume [the same --set ...]
# (no Tune experiment: the trials cut off continue under their own Optuna trials and runs,
# tests/fault/test_driver_faults.py, ..._as_its_run_archive_and_resumes).
# A machine idle for over 30 s goes back and takes /tmp with it: no pauses between calls
# (issue the next poll straight after the last returns; start nothing else in between:
# a run was lost at step 650 of 1500 that way).
set -eo pipefail
stage="$1"
shift || true
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT" /tmp/bdmparts /tmp/bdmcache /tmp/run
export TORCH_HOME=/tmp/th BINARYDM_CACHE_DIR=/tmp/bdmcache BINARYDM_DATA_ROOT=/tmp/bdm/data
export PYTHONUNBUFFERED=1 RAY_DEDUP_LOGS=0
weights="$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth"
teacher_sha=f5f579c3a819fcb0f1ba512713008d179671296bd2c2e27c8a49480e765ec4df

setup() {
    # shellcheck disable=SC1091
    source /tmp/bdm-setup.sh
}

shopt -s nullglob
# Whether a process is alive: a zombie (ended, not yet reaped where PID 1 does not reap)
# is not.
alive() {
    [ -e "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

# Whether any study started by `start` is still running.
running() {
    for pidfile in /tmp/run/*/study.pid; do
        alive "$(cat "$pidfile")" && return 0
    done
    return 1
}

# The code snapshot studies and jobs run from (see `start`): taken afresh only while none runs.
snapshot() {
    if ! running; then
        rm -rf /tmp/code && mkdir -p /tmp/code
        cp -r binarydm benchmarks search_spaces pyproject.toml /tmp/code/
    fi
}

case "$stage" in
part)
    cp ".bdmpayload/part-$1" /tmp/bdmparts/
    [ -f .bdmpayload/manifest.json ] && cp .bdmpayload/manifest.json /tmp/bdmparts/
    ls -la /tmp/bdmparts
    nvidia-smi -L
    ;;
unpack)
    [ -f .bdmpayload/manifest.json ] && cp .bdmpayload/manifest.json /tmp/bdmparts/
    for part in .bdmpayload/part-*; do [ -f "$part" ] && cp "$part" /tmp/bdmparts/; done
    python3 benchmarks/device_payload.py unpack --parts /tmp/bdmparts --to /tmp/bdm
    rm -rf /tmp/bdmparts
    rm -rf .devbundle && cp -r /tmp/bdm/.devbundle .devbundle
    cp .devbundle/setup.sh /tmp/bdm-setup.sh
    mkdir -p "$(dirname "$weights")" && mv /tmp/bdm/fid.pth "$weights"
    echo "$teacher_sha  /tmp/bdm/teacher/diffusion_pytorch_model.safetensors" | sha256sum -c
    setup
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    nproc | tee -a "$OUT/gpu.txt"
    python3 -c "import torch, ray, diffusers, mlflow, optuna; print(torch.__version__, \
torch.version.cuda, ray.__version__, diffusers.__version__, mlflow.__version__, \
optuna.__version__)" | tee -a "$OUT/gpu.txt"
    # A smoke run of the real study file at a toy size: every GPU code path (EBB, LRM
    # units, the FP reference task, inline trials, FID, precision/recall) in a minute.
    # SMOKE=0 skips it where the held machine's time is short (the study's first poll
    # shows a broken path as soon).
    [ "${SMOKE:-1}" = 0 ] && exit 0
    mkdir -p /tmp/smoke && cd /tmp/smoke
    timeout 400 bdm-search "$OLDPWD/benchmarks/studies/cifar10_w1a4.yaml" \
        --set teacher.pretrained=/tmp/bdm/teacher --set name=smoke --set 'search.seeds=[0]' \
        --set training.steps=20 --set training.checkpoint_every=10 --set training.log_every=10 \
        --set evaluation.fid_dims=64 --set evaluation.fid_samples=200 \
        --set evaluation.sampling_steps=5 --set evaluation.sample_batch_size=200 \
        --set evaluation.test_loss_images=64 2>&1 | tail -40 | tee "$OUT/smoke.log"
    ;;
start)
    # The study runs from a snapshot of the code: every device call re-copies the working
    # tree, and a study importing a module lazily while the next call's copy is being
    # made failed with "No module named binarydm.train._batches" (2026-12-01).
    # Studies started while another runs share its snapshot (the same code for both); with
    # none running, the snapshot is taken afresh, so a later study runs the current tree.
    snapshot
    cd /tmp/code
    setup
    study="$1"
    name="$2"
    shift 2
    # Several studies may run at once (one per seed set: a study runs its seeds one after
    # the other inside each trial), each in its own folder (stores, log) and with its own
    # local Ray cluster: a separate RAY_TMPDIR keeps ray.init from joining the other's,
    # which would end with the first driver to finish.
    dir="/tmp/run/$name"
    mkdir -p "$dir" "/tmp/ray-$name"
    cd "$dir"
    # Its own session: it outlives this call and is polled by the next ones.
    # Appended: a resumed study's log continues the restored one.
    RAY_TMPDIR="/tmp/ray-$name" setsid nohup bdm-search "/tmp/code/$study" \
        --set teacher.pretrained=/tmp/bdm/teacher --set "name=$name" "$@" \
        >>"$dir/$name.log" 2>&1 </dev/null &
    echo $! >"$dir/study.pid"
    sleep 20
    tail -5 "$dir/$name.log"
    ;;
job)
    # Any other command (a benchmark) beside the studies, from the same code snapshot, in
    # its own session and folder: polled like a study; its JSON files come back too.
    name="$1"
    shift
    snapshot
    cd /tmp/code
    setup
    dir="/tmp/run/$name"
    mkdir -p "$dir"
    setsid nohup "$@" >>"$dir/$name.log" 2>&1 </dev/null &
    echo $! >"$dir/study.pid"
    sleep 5
    tail -5 "$dir/$name.log"
    ;;
restore)
    # A study's stores from an earlier session, back at the path they were written at
    # (the MLflow runs' artifact URIs and Tune's experiment name absolute paths).
    name="$1"
    if [ -e "/tmp/run/$name/mlflow.db" ]; then
        echo "/tmp/run/$name already holds a study's stores: not overwritten" >&2
        exit 1
    fi
    mkdir -p "/tmp/run/$name"
    tar -xzf ".bdmpayload/$name-stores.tgz" -C "/tmp/run/$name"
    ls -la "/tmp/run/$name"
    ;;
stop)
    # End a study as a lost machine would: SIGKILL to its process group (the driver, its
    # Ray, the trials), the case tests/fault/test_driver_faults.py resumes from. (A SIGINT
    # would not do: `start` runs it as a background job of a non-interactive shell, which
    # ignores SIGINT.) Its unfinished trials stay RUNNING for a resume; `poll` then brings
    # the stores back.
    pid="$(cat "/tmp/run/$1/study.pid")"
    kill -KILL -- "-$pid" 2>/dev/null || true
    for _ in $(seq 30); do alive "$pid" || break; sleep 1; done
    echo "stopped $1"
    ;;
import)
    # A study's committed run archive as its stores, where `start NAME --resume` reads them.
    name="$1"
    if [ -e "/tmp/run/$name/mlflow.db" ]; then
        echo "/tmp/run/$name already holds a study's stores: not overwritten" >&2
        exit 1
    fi
    archive="$PWD/benchmarks/results/runs/$name"
    setup  # from the project root: the setup puts the working directory on PYTHONPATH
    mkdir -p "/tmp/run/$name" && cd "/tmp/run/$name"
    bdm-search import "$archive" --tracking-uri "sqlite:////tmp/run/$name/mlflow.db" \
        --optuna-storage "sqlite:////tmp/run/$name/optuna.db"
    ;;
poll)
    limit="${1:-500}"
    waited=0
    while running && [ "$waited" -lt "$limit" ]; do
        sleep 10
        waited=$((waited + 10))
    done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader || true
    for dir in /tmp/run/*/; do
        name="$(basename "$dir")"
        echo "== $name"
        grep -E "trial|Pareto|error|Error" "$dir/$name.log" | tail -8 || true
        tail -12 "$dir/$name.log"
        # Stores and small artifacts only (sample grids, plots, configs); packed models
        # stay: they are rebuilt from the checkpoints' runs when needed. They come back
        # with every poll, so the finished trials survive a machine lost mid-study.
        # Ray Tune's experiment too (for --resume in a later session), without the
        # trials' checkpoint folders (about 570 MB each at ddpm-cifar10), placed ones or
        # ones being written (CheckpointStore's hidden .staging-*/.checkpoint_* folders).
        cp "$dir"/*.json "$OUT/" 2>/dev/null || true  # a job's results
        [ -f "$dir/mlflow.db" ] || continue  # a job: no stores
        stores=(mlflow.db optuna.db "$name.log" mlartifacts)
        [ -d "$dir/ray_results" ] && stores+=(ray_results)
        (cd "$dir" && tar --exclude='*.bdm' --exclude='ray_results/trials/*/checkpoint_*' \
            --exclude='ray_results/trials/*/.*' -czf "$OUT/$name-stores.tgz" \
            "${stores[@]}" 2>/dev/null) || true
        # Each trial's last metrics as text too: the reply's output always comes back,
        # its files not always ("none could be copied" after the last poll of
        # 2026-12-02 lost a finished study's final store; its FIDs survived in the log).
        [ -f "$dir/mlflow.db" ] && python3 - "$dir/mlflow.db" <<'PY' || true
import sqlite3, sys
keys = ("fid", "precision", "recall", "test_loss", "size_mib", "weight_bits", "train_s",
        "timing/sample_s")
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
for run_id, name, status in db.execute("select run_uuid, name, status from runs order by name"):
    params = dict(db.execute("select key, value from params where run_uuid=?", (run_id,)))
    last = dict(db.execute(
        "select key, value from metrics m where run_uuid=? and step=(select max(step) from"
        " metrics where run_uuid=m.run_uuid and key=m.key)", (run_id,)))
    cells = [f"{k}={last[k]:.5g}" for k in keys if k in last]
    case = " ".join(f"{k}={params[k]}" for k in ("row", "seed") if k in params)
    print(f"metrics {name} {run_id[:8]} {status} {case} {' '.join(cells)}")
PY
    done
    ls -la "$OUT"
    if running; then
        echo "running after ${waited}s"
    else
        echo "done"
    fi
    ;;
*)
    echo "usage: $0 part NN | unpack | restore NAME | import NAME | start STUDY NAME [--set ...] |" \
        "job NAME CMD... | stop NAME | poll SECONDS" >&2
    exit 2
    ;;
esac

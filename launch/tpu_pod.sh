#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice: ships this repository to every worker, installs it there in a
# Python >= 3.11 virtual environment, then runs the SAME command on all workers at once, detached,
# one log file per worker. Each worker is one jax process; rerank/training/distributed.py lets
# jax find the slice's other workers (TPU VM metadata), the mesh spans every chip of the slice,
# process 0 writes logs and results, all workers write checkpoints.
#
#   export TPU_NAME=my-v4-32 ZONE=us-central2-b
#   launch/tpu_pod.sh setup                       # once per slice, and after changing the code
#   launch/tpu_pod.sh run python -m rerank.train --config=configs/demo.py --workdir=gs://B/runs/demo
#   launch/tpu_pod.sh logs [WORKER] [-f]          # last lines of a worker's log (default 0)
#   launch/tpu_pod.sh stop                        # SIGTERM on every worker: checkpoint and exit
#
# setup ships `git archive` of the repository (committed files plus uncommitted changes to them;
# no untracked files, workdirs, data or caches), unpacks it into REMOTE_DIR and installs it
# with `pip install -e .[tpu]` into REMOTE_VENV. Stock TPU VM images ship Python 3.10, so the
# environment is made by uv (installed with pip if missing), which downloads a Python >= 3.11
# when the image has none.
# run starts CMD in REMOTE_DIR with the environment's python first on PATH, under nohup and its
# own process group, and returns at once; worker N writes LOG_DIR/latest.wN.log (a link to
# LOG_DIR/<time>.wN.log). It refuses to start while a previous command still runs.
# stop sends SIGTERM to that process group on every worker: the trainer saves a checkpoint at
# the current step and exits 0; `run` with the same command resumes. A preempted spot slice
# gets the same SIGTERM; recreate it, `setup`, and `run` again.
#
# Env: TPU_NAME, ZONE (required); PROJECT (default: gcloud's); REMOTE_DIR (default ~/rerank),
# REMOTE_VENV (default ~/rerank-venv), LOG_DIR (default ~/rerank-logs) on the workers;
# LOG_LINES (default 100) for `logs`;
# DRY_RUN=1 prints the gcloud commands instead of running them.
# The workdir must be one every worker sees: a gs:// bucket (rerank writes it directly) or a
# Filestore/NFS mount. Checkpoints are written by all workers, metrics and results by worker 0.
set -euo pipefail
usage() {
  echo "usage: TPU_NAME=... ZONE=... $0 setup | run CMD... | logs [WORKER] [-f] | stop" >&2
  exit 2
}
[[ $# -ge 1 ]] || usage
: "${TPU_NAME:?set TPU_NAME to the TPU VM slice name}"
: "${ZONE:?set ZONE to the slice zone, e.g. us-central2-b}"
# Paths on the workers, expanded by the worker's shell ($HOME is the worker's).
remote_dir=${REMOTE_DIR:-'$HOME/rerank'}
venv=${REMOTE_VENV:-'$HOME/rerank-venv'}
log_dir=${LOG_DIR:-'$HOME/rerank-logs'}
gcloud_args=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && gcloud_args+=(--project="$PROJECT")
repo=$(cd "$(dirname "$0")/.." && pwd)

gcloud_() {
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' gcloud "$@"; echo
  else
    gcloud "$@"
  fi
}
# ssh_ WORKER SCRIPT: runs SCRIPT on one worker (0, 1, ...) or on all of them at once, after
# setting dir, venv, logs and w (the worker's index: TPU VM metadata, else the hostname's -w-N).
ssh_() {
  local prelude="set -euo pipefail; dir=\"$remote_dir\"; venv=\"$venv\"; logs=\"$log_dir\"
    md=http://metadata.google.internal/computeMetadata/v1/instance/attributes
    w=\$(curl -sf -H Metadata-Flavor:Google \$md/agent-worker-number || hostname | sed 's/.*-w-//')"
  gcloud_ compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" --worker="$1" \
    --command="$prelude
$2"
}

case "$1" in
  setup)
    [[ $# -eq 1 ]] || usage
    tarball=$(mktemp /tmp/rerank.XXXXXX.tar.gz)
    trap 'rm -f "$tarball"' EXIT
    # `git stash create` is a commit of the working tree's changes to tracked files (empty when
    # there are none); archiving it ships exactly the repository as `git status` sees it.
    rev=$(git -C "$repo" stash create)
    git -C "$repo" archive --format=tar.gz -o "$tarball" "${rev:-HEAD}"
    gcloud_ compute tpus tpu-vm scp "$tarball" "$TPU_NAME:/tmp/rerank.tar.gz" "${gcloud_args[@]}" \
      --worker=all
    ssh_ all '
      mkdir -p "$dir" && tar -C "$dir" -xzf /tmp/rerank.tar.gz && rm /tmp/rerank.tar.gz
      export PATH="$HOME/.local/bin:$PATH"
      command -v uv >/dev/null || python3 -m pip install -q --user uv \
        || curl -LsSf https://astral.sh/uv/install.sh | sh
      [ -x "$venv/bin/python" ] || uv venv -q --python ">=3.11" "$venv"
      uv pip install -q --python "$venv/bin/python" -e "$dir[tpu]"
      # Versions only: touching the TPU here would start a jax runtime outside the job.
      "$venv/bin/python" -c "import sys, jax, libtpu; print(\"worker $w: Python\", sys.version.split()[0], \"jax\", jax.__version__)"'
    ;;
  run)
    shift; [[ $# -ge 1 ]] || usage
    cmd=$(printf '%q ' "$@")  # each argument stays whole through the worker's shell
    ssh_ all '
      mkdir -p "$logs"
      if [ -f "$logs/pid.w$w" ] && kill -0 -- -"$(cat "$logs/pid.w$w")" 2>/dev/null; then
        echo "worker $w: a previous command still runs (launch/tpu_pod.sh stop)" >&2; exit 1
      fi
      log="$logs/$(date -u +%Y%m%dT%H%M%S).w$w.log"; ln -sfn "$log" "$logs/latest.w$w.log"
      cd "$dir"
      # setsid: the command leads its own process group, which `stop` signals as a whole.
      PATH="$venv/bin:$PATH" nohup setsid '"$cmd"' >"$log" 2>&1 </dev/null &
      echo $! >"$logs/pid.w$w"
      echo "worker $w: started, log $log"'
    ;;
  logs)
    shift; worker=0; follow=""
    for a in "$@"; do
      if [[ "$a" == -f ]]; then follow=-f
      elif [[ "$a" =~ ^[0-9]+$ ]]; then worker=$a
      else usage
      fi
    done
    ssh_ "$worker" 'tail -n '"${LOG_LINES:-100} $follow"' "$logs/latest.w$w.log"'
    ;;
  stop)
    [[ $# -eq 1 ]] || usage
    ssh_ all '
      if [ -f "$logs/pid.w$w" ] && kill -TERM -- -"$(cat "$logs/pid.w$w")" 2>/dev/null; then
        echo "worker $w: SIGTERM sent; it checkpoints and exits"
      else
        echo "worker $w: nothing running"
      fi'
    ;;
  *) usage ;;
esac

#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice: copies this repository to every worker, installs it there,
# then runs the SAME command on all workers at once. Each worker is one jax process;
# rerank/distributed.py sees the slice (TPU_WORKER_HOSTNAMES) and joins them, the mesh spans
# every chip of the slice, process 0 writes logs and results, all workers write checkpoints.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh setup
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh run \
#       python -m rerank.train --config=configs/demo.py --workdir=/mnt/shared/runs/demo
#
# Env: TPU_NAME, ZONE (required), PROJECT (optional: gcloud's default otherwise),
# REMOTE_DIR (where the repo lives on the workers, default ~/rerank).
# The workdir must be a directory every worker sees (a Filestore/NFS mount or a gcsfuse-mounted
# bucket): checkpoints are written by all workers, metrics and results by worker 0.
# Preemption: a spot/preemptible TPU VM gets SIGTERM first; the trainer saves at that step and
# exits 0. Recreate the slice, `setup` again, and rerun the same `run` command to resume.
set -euo pipefail
usage() { echo "usage: TPU_NAME=... ZONE=... $0 setup | run CMD..." >&2; exit 2; }
[[ $# -ge 1 ]] || usage
: "${TPU_NAME:?set TPU_NAME to the TPU VM slice name}"
: "${ZONE:?set ZONE to the slice zone, e.g. us-central2-b}"
remote_dir=${REMOTE_DIR:-'~/rerank'}
gcloud_args=(--zone="$ZONE" --worker=all)
[[ -n "${PROJECT:-}" ]] && gcloud_args+=(--project="$PROJECT")
repo=$(cd "$(dirname "$0")/.." && pwd)

case "$1" in
  setup)
    # Ship the working tree (no workdirs or caches), then install with the TPU build of jax.
    tarball=$(mktemp /tmp/rerank.XXXXXX.tar.gz)
    tar -C "$repo" --exclude=.git --exclude=workdirs --exclude='__pycache__' -czf "$tarball" .
    gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:/tmp/rerank.tar.gz" "${gcloud_args[@]}"
    rm -f "$tarball"
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" --command="
      set -e; mkdir -p $remote_dir && tar -C $remote_dir -xzf /tmp/rerank.tar.gz &&
      cd $remote_dir && pip install -q -e . 'jax[tpu]>=0.10,<0.11' \
        -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
    ;;
  run)
    shift; [[ $# -ge 1 ]] || usage
    # printf %q keeps each argument whole through the remote shell.
    cmd=$(printf '%q ' "$@")
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" \
      --command="cd $remote_dir && $cmd"
    ;;
  *) usage ;;
esac

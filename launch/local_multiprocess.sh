#!/usr/bin/env bash
# Simulates an N-host job on one machine: N copies of CMD, each a "host" with its own CPU
# devices, joined through a local coordinator (rerank/distributed.py reads the RERANK_* vars)
# and gloo collectives. The tests use it; it is also the quickest way to try a multi-host run.
#
#   launch/local_multiprocess.sh N CMD...
#   launch/local_multiprocess.sh 2 python -m rerank.train --config=configs/demo.py:runlocal --workdir=DIR
#
# Env: RERANK_LOCAL_DEVICES (CPU devices per process, default 4), RERANK_PORT (coordinator port,
# default a free one). Process 0's output goes to stdout/stderr; process i>0 writes
# ${RERANK_LOG_DIR:-/tmp}/rerank_proc<i>.log. SIGTERM/SIGINT are forwarded to every process.
# Exits with the first non-zero exit status among the processes (0 if all succeed).
set -u
if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N CMD... (N = number of simulated hosts, a positive integer)" >&2
  exit 2
fi
n=$1; shift
devices=${RERANK_LOCAL_DEVICES:-4}
free_port='import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
port=${RERANK_PORT:-$(python3 -c "$free_port")}
log_dir=${RERANK_LOG_DIR:-/tmp}

pids=()
forward() { for p in "${pids[@]}"; do kill -s "$1" "$p" 2>/dev/null; done; }
trap 'forward TERM' TERM
trap 'forward INT' INT

run_one() {
  # exec: the background job's pid is the command's own, so signals reach it directly.
  exec env JAX_PLATFORMS=cpu \
    XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}" \
    RERANK_COORDINATOR="127.0.0.1:${port}" RERANK_NUM_PROCESSES="$n" RERANK_PROCESS_ID="$1" \
    "${@:2}"
}
for ((i = 0; i < n; i++)); do
  if ((i == 0)); then
    run_one "$i" "$@" &
  else
    run_one "$i" "$@" >"${log_dir}/rerank_proc${i}.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for ((i = 0; i < n; i++)); do
  # `wait` returns early when a trapped signal arrives; wait again until the process is gone.
  while true; do
    wait "${pids[$i]}"; rc=$?
    kill -0 "${pids[$i]}" 2>/dev/null || break
  done
  if ((rc != 0 && status == 0)); then status=$rc; fi
done
exit $status

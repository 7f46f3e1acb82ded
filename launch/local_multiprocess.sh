#!/usr/bin/env bash
# Simulates an N-host job on one machine: N copies of CMD, each a "host" with its own CPU
# devices, joined through a local coordinator (rerank/distributed.py reads the RERANK_* vars)
# and gloo collectives. The tests use it; it is also the quickest way to try a multi-host run.
#
#   launch/local_multiprocess.sh N CMD...
#   launch/local_multiprocess.sh 2 python -m rerank.train --config=configs/demo.py:runlocal --workdir=DIR
#
# Env: RERANK_LOCAL_DEVICES (CPU devices per process, default 4), RERANK_PORT (coordinator port,
# default a free one, held from its choice until the job ends so nothing else can take it).
# Process 0's output goes to stdout/stderr; process i>0 writes $RERANK_LOG_DIR/rerank_proc<i>.log
# (default: a new temporary folder, named on stderr). SIGTERM/SIGINT are forwarded to every
# process. When a process fails, the others are sent SIGTERM (they would wait for it in the next
# collective until a timeout). Exits with the exit status of the first process to fail (0 if all
# succeed).
set -u
if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N CMD... (N = number of simulated hosts, a positive integer)" >&2
  exit 2
fi
n=$1; shift
devices=${RERANK_LOCAL_DEVICES:-4}
if [[ -n ${RERANK_PORT:-} ]]; then
  port=$RERANK_PORT
else
  # A free port, bound with SO_REUSEPORT and never listened on: jax's coordinator (gRPC, which
  # sets SO_REUSEPORT too) can bind it, no other program can. The holder exits when this
  # script does (its stdin, the coprocess pipe, closes).
  hold_port='import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
sys.stdin.read()'
  coproc PORT_HOLDER { exec python3 -c "$hold_port"; }
  read -r port <&"${PORT_HOLDER[0]}" || { echo "$0: could not reserve a port" >&2; exit 1; }
fi
if [[ -n ${RERANK_LOG_DIR:-} ]]; then
  log_dir=$RERANK_LOG_DIR
elif ((n > 1)); then
  log_dir=$(mktemp -d "${TMPDIR:-/tmp}/rerank_logs.XXXXXX") || exit 1
  echo "$0: processes 1..$((n - 1)) log to ${log_dir}/rerank_proc<i>.log" >&2
fi

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
running=("${pids[@]}")
# Polled rather than `wait -n`: that one would also count the port holder among the jobs.
while ((${#running[@]})); do
  for i in "${!running[@]}"; do
    kill -0 "${running[$i]}" 2>/dev/null && continue
    wait "${running[$i]}"; rc=$?
    unset "running[$i]"
    if ((rc != 0 && status == 0)); then
      status=$rc
      forward TERM
    fi
  done
  if ((${#running[@]})); then sleep 0.2; fi
done
exit $status

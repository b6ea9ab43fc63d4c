#!/usr/bin/env bash
# Runs resnorm-train as NUM_PROCESSES cooperating processes on this machine (127.0.0.1), the
# way a multi-host job runs: one JAX process per "host", each with its own devices.
#
#   launch/local.sh 2 --config=configs/quickstart.py --workdir=runs/mp
#
# Environment: DEVICES_PER_PROCESS (CPU devices each process simulates, default 4),
# PORT (coordinator port, default 12355 + a hash of the workdir), PYTHON (interpreter,
# default .venv/bin/python or python3).  Logs: <workdir>/process_<i>.log (for a gs://
# workdir: LOG_DIR, default runs/local_logs/<bucket path>); process 0 also prints to the
# console.  Exits with the first non-zero exit code of any process.
set -uo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: launch/local.sh NUM_PROCESSES [resnorm-train flags]" >&2
  exit 2
fi
n=$1; shift
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
workdir="runs/local_multiprocess"
for arg in "$@"; do
  case "$arg" in --workdir=*) workdir="${arg#--workdir=}" ;; esac
done
logdir="$workdir"
if [[ "$workdir" == gs://* ]]; then
  logdir="${LOG_DIR:-runs/local_logs/${workdir#gs://}}"
fi
mkdir -p "$logdir"
port="${PORT:-$((12355 + $(printf '%s' "$workdir" | cksum | cut -d' ' -f1) % 2000))}"
devices="${DEVICES_PER_PROCESS:-4}"
flags="${XLA_FLAGS:-}"
flags="$(echo "$flags" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"
export XLA_FLAGS="$flags --xla_force_host_platform_device_count=$devices"

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done; }
trap cleanup TERM INT
for ((i = 0; i < n; i++)); do
  log="$logdir/process_$i.log"
  args=(-m resnorm_jax.train --coordinator_address="127.0.0.1:$port" --num_processes="$n"
        --process_id="$i" "$@")
  if [[ $i -eq 0 ]]; then
    "$python" "${args[@]}" > >(tee "$log") 2> >(tee -a "$log" >&2) &
  else
    "$python" "${args[@]}" > "$log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "launch/local.sh: process $i exited with code $rc (log: $logdir/process_$i.log)" >&2
    if [[ $status -eq 0 ]]; then status=$rc; fi
  fi
done
exit $status

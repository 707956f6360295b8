#!/usr/bin/env bash
# Launch a MindSpore job with msrun: the argument forms and defaults of MindFormers'
# scripts/msrun_launcher.sh (r1.5-1.9), so cluster users keep their command lines.
#
#   bash scripts/msrun_launcher.sh "CMD"                                   # 8 workers on this node
#   bash scripts/msrun_launcher.sh "CMD" WORKER_NUM                        # WORKER_NUM on this node
#   bash scripts/msrun_launcher.sh "CMD" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT
#   bash scripts/msrun_launcher.sh "CMD" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT \
#                                        NODE_RANK LOG_DIR JOIN CLUSTER_TIME_OUT   # multi-node
#
# CMD is "script.py args..." (msrun starts `python script.py args...` once per worker).
# Defaults: WORKER_NUM 8, LOCAL_WORKER 8, MASTER_ADDR 127.0.0.1, MASTER_PORT 8118, NODE_RANK 0,
# LOG_DIR output/msrun_log, JOIN False, CLUSTER_TIME_OUT 7200. Worker N logs to LOG_DIR/worker_N.log.
# MSRUN=/path/to/msrun overrides which msrun runs (default: the repo's .venv/bin/msrun, else PATH).
# MF_LOG_SUFFIX=x appends _x to LOG_DIR, as MindFormers does.
set -u

usage() {
  cat >&2 <<'USAGE'
Usage: bash scripts/msrun_launcher.sh "CMD"                        (8 workers, this node)
       bash scripts/msrun_launcher.sh "CMD" WORKER_NUM             (WORKER_NUM workers, this node)
       bash scripts/msrun_launcher.sh "CMD" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT
       bash scripts/msrun_launcher.sh "CMD" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN CLUSTER_TIME_OUT
USAGE
}

WORKER_NUM=8
LOCAL_WORKER=8
MASTER_ADDR="127.0.0.1"
MASTER_PORT=8118
NODE_RANK=0
LOG_DIR="output/msrun_log"
JOIN="False"
CLUSTER_TIME_OUT=7200

case $# in
  1) ;;
  2) WORKER_NUM=$2; LOCAL_WORKER=$2 ;;
  6) WORKER_NUM=$2; LOCAL_WORKER=$2; MASTER_PORT=$3; LOG_DIR=$4; JOIN=$5; CLUSTER_TIME_OUT=$6 ;;
  9) WORKER_NUM=$2; LOCAL_WORKER=$3; MASTER_ADDR=$4; MASTER_PORT=$5; NODE_RANK=$6; LOG_DIR=$7; JOIN=$8
     CLUSTER_TIME_OUT=$9 ;;
  *) echo "error: expected 1, 2, 6 or 9 arguments, got $#" >&2; usage; exit 1 ;;
esac

CMD=$1
if [ -z "${CMD// /}" ]; then
  echo "error: CMD (the first argument) is empty; give \"run_mindformer.py --config ...\"" >&2; exit 1
fi
for pair in "WORKER_NUM:$WORKER_NUM" "LOCAL_WORKER:$LOCAL_WORKER" "MASTER_PORT:$MASTER_PORT" \
            "NODE_RANK:$NODE_RANK" "CLUSTER_TIME_OUT:$CLUSTER_TIME_OUT"; do
  name=${pair%%:*}; value=${pair#*:}
  if ! [[ $value =~ ^[0-9]+$ ]]; then
    echo "error: $name=$value is not a non-negative integer" >&2; usage; exit 1
  fi
done
if [ "$WORKER_NUM" -lt 2 ]; then
  echo "error: WORKER_NUM=$WORKER_NUM: msrun is for 2 or more workers, as in MindFormers." >&2
  echo "       For one process run the command with plain python, e.g.:" >&2
  echo "       python $CMD" >&2
  exit 1
fi
if [ "$LOCAL_WORKER" -lt 1 ] || [ "$LOCAL_WORKER" -gt "$WORKER_NUM" ]; then
  echo "error: LOCAL_WORKER=$LOCAL_WORKER must be between 1 and WORKER_NUM=$WORKER_NUM" >&2; exit 1
fi
if [ "$JOIN" != "True" ] && [ "$JOIN" != "False" ]; then
  echo "error: JOIN=$JOIN must be True or False" >&2; exit 1
fi
if [ "$MASTER_PORT" -lt 1024 ] || [ "$MASTER_PORT" -gt 65535 ]; then
  echo "error: MASTER_PORT=$MASTER_PORT must be in 1024..65535" >&2; exit 1
fi

if [ -n "${MF_LOG_SUFFIX:-}" ]; then
  LOG_DIR="${LOG_DIR}_${MF_LOG_SUFFIX}"
fi

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "${MSRUN:-}" ]; then
  MSRUN_BIN=$MSRUN
elif [ -x "$REPO_ROOT/.venv/bin/msrun" ]; then
  MSRUN_BIN="$REPO_ROOT/.venv/bin/msrun"
  export PATH="$REPO_ROOT/.venv/bin:$PATH"   # the workers' python is the venv's too
else
  MSRUN_BIN=$(command -v msrun || true)
fi
if [ -z "$MSRUN_BIN" ] || ! command -v "$MSRUN_BIN" >/dev/null 2>&1; then
  echo "error: msrun not found. It ships with MindSpore: run \`make venv\` (installs mindspore into .venv)," >&2
  echo "       or activate the environment that has MindSpore, or set MSRUN=/path/to/msrun." >&2
  exit 127
fi

mkdir -p "$LOG_DIR"
# Word-split CMD on purpose (as MindFormers' eval does) so "script.py --a b" becomes arguments.
# shellcheck disable=SC2206
CMD_ARGS=($CMD)
MSRUN_ARGS=(--worker_num="$WORKER_NUM" --local_worker_num="$LOCAL_WORKER" --master_addr="$MASTER_ADDR"
            --master_port="$MASTER_PORT" --node_rank="$NODE_RANK" --log_dir="$LOG_DIR" --join="$JOIN"
            --cluster_time_out="$CLUSTER_TIME_OUT")

if [ "$WORKER_NUM" != "$LOCAL_WORKER" ]; then
  echo "worker_num=$WORKER_NUM, local_worker=$LOCAL_WORKER: start this script on every node with its NODE_RANK."
fi
echo "Running Command: $MSRUN_BIN ${MSRUN_ARGS[*]} ${CMD_ARGS[*]}"
echo "Worker logs: $LOG_DIR/worker_N.log"
ulimit -u unlimited 2>/dev/null || true
exec "$MSRUN_BIN" "${MSRUN_ARGS[@]}" "${CMD_ARGS[@]}"

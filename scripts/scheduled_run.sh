#!/usr/bin/env bash
# A scheduled rerun of the whole flow (`mlflow run <project> -e main`), safe to start from cron:
# - one at a time: a run that finds the lock held exits 75. main itself holds a lock on its tracking
#   server and experiment until it and all its steps have ended (docs/reliability.md); this script's
#   own lock below only spares a main run when the previous script is still at work;
# - the output goes to a timestamped log file, whose path is printed;
# - the exit status is main's, so the scheduler sees failures.
# Arguments are passed to `mlflow run`, e.g. -P model_id=microsoft/Phi-3-mini-4k-instruct.
# MLFLOW_TRACKING_URI (and credentials) come from the environment, as for any `mlflow run`.
set -uo pipefail

project_dir="$(cd "$(dirname "$0")/.." && pwd)"
# Outside the project: a log file inside a git checkout would make its tree dirty, and a dirty
# tree never reuses any step.
log_dir="${PHI3FLOW_LOG_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/phi3flow}"
env_manager="${PHI3FLOW_ENV_MANAGER:-local}"
mkdir -p "$log_dir"

# This shell's file descriptor 9 holds the script's lock; `mlflow run` inherits it, main and its
# steps do not (MLflow starts them with close_fds=True): killing the CLI frees it, never main's lock.
exec 9>>"$log_dir/scheduled_run.lock"
if ! flock --nonblock 9; then
    echo "error: another scheduled run of main holds $log_dir/scheduled_run.lock; not starting" >&2
    exit 75  # EX_TEMPFAIL: try again at the next slot
fi

log="$log_dir/main-$(date -u +%Y%m%dT%H%M%SZ)-$$.log"
echo "$(date -u +%FT%TZ) running main of $project_dir (env manager $env_manager); output in $log"
mlflow run "$project_dir" -e main --env-manager "$env_manager" "$@" >"$log" 2>&1
status=$?
if [ "$status" -ne 0 ] && grep -q '^error: another run of main is in progress' "$log"; then
    grep '^error:' "$log" >&2
    exit 75  # main found a run still at work (one whose CLI or script was killed)
fi
if [ "$status" -ne 0 ]; then
    echo "error: main failed with exit status $status; output in $log" >&2
    # main's one-line errors; where main printed none (a mistyped -P is click's "Error: No such option",
    # a tracking store that refused `mlflow run` itself ends in a traceback), the log's last error line,
    # or its last line
    grep '^error:' "$log" >&2 ||
        { grep -E '^[A-Za-z_.]*(Error|Exception): ' "$log" || tail -n 1 "$log"; } | tail -n 1 >&2
else
    echo "$(date -u +%FT%TZ) $(grep '^main run ' "$log" | tail -n 1)"
fi
exit "$status"

#!/usr/bin/env bash
# Start the ossnet MLflow tracking server (UI, REST API, model registry, artifact proxy).
#
# By default: a SQLite backend and a local artifact store under $OSSNET_MLFLOW_HOME, bound
# to 127.0.0.1. With environment variables it runs as a team server on PostgreSQL and an
# S3-compatible store (SeaweedFS, AWS S3). Artifacts are always proxied by the server
# (--serve-artifacts), so clients need only the tracking URI, never storage credentials.
# The script `exec`s the server: its pid is the server's (SIGTERM stops it cleanly).
#
# Usage: mlflow/server.sh [--host H] [--port N] [--backend-store-uri URI]
#                         [--artifacts-destination URI] [--allowed-hosts LIST]
#                         [--workers N] [--pid-file PATH] [-- extra `mlflow server` flags]
#
# Environment (flags win; defaults in brackets):
#   OSSNET_MLFLOW_HOME            local data directory [$OSSNET_HOME, else <repo>/.ossnet]: the
#                                 same store `ossnet` uses without a server
#                                 (pipelines/tracking/uri.py), so the UI shows local runs too
#   OSSNET_MLFLOW_HOST            bind address [127.0.0.1]; in a container use 0.0.0.0 and
#                                 publish the port on 127.0.0.1 or put TLS + auth in front
#   OSSNET_MLFLOW_PORT            port [5000]
#   MLFLOW_BACKEND_STORE_URI      runs and registry [sqlite:///$OSSNET_MLFLOW_HOME/mlflow.db],
#                                 e.g. postgresql://mlflow:PASSWORD@postgres:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION  artifact store [$OSSNET_MLFLOW_HOME/mlartifacts],
#                                 e.g. s3://mlflow-artifacts/ossnet
#   MLFLOW_S3_ENDPOINT_URL        S3-compatible endpoint, e.g. http://s3:8333 (with
#                                 AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, read by boto3)
#   OSSNET_MLFLOW_ALLOWED_HOSTS   extra accepted Host headers, comma-separated, appended to
#                                 localhost/127.0.0.1 (any port); fnmatch wildcards, e.g.
#                                 "mlflow,mlflow:*,mlflow.ml.svc.cluster.local:*"
#                                 (MLflow rejects requests whose Host header is not listed)
#   OSSNET_MLFLOW_WORKERS         uvicorn worker processes [2]
#   OSSNET_MLFLOW_PID_FILE        write the server pid here [none]
#   OSSNET_MLFLOW                 the `mlflow` executable [<repo>/.venv/bin/mlflow, else PATH]
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's GenAI job runner [false here: ossnet does not
#                                 use it and it would start extra worker processes]
#
# Clients: MLFLOW_TRACKING_URI=http://127.0.0.1:5000. Health check: GET /health -> "OK".
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOME_DIR="${OSSNET_MLFLOW_HOME:-${OSSNET_HOME:-$REPO_ROOT/.ossnet}}"
HOST="${OSSNET_MLFLOW_HOST:-127.0.0.1}"
PORT="${OSSNET_MLFLOW_PORT:-5000}"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-}"
EXTRA_HOSTS="${OSSNET_MLFLOW_ALLOWED_HOSTS:-}"
WORKERS="${OSSNET_MLFLOW_WORKERS:-2}"
PID_FILE="${OSSNET_MLFLOW_PID_FILE:-}"

die() { echo "mlflow/server.sh: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

EXTRA_ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --host) need_value "$@"; HOST="$2"; shift 2 ;;
        --port) need_value "$@"; PORT="$2"; shift 2 ;;
        --backend-store-uri) need_value "$@"; BACKEND="$2"; shift 2 ;;
        --artifacts-destination) need_value "$@"; ARTIFACTS="$2"; shift 2 ;;
        --allowed-hosts) need_value "$@"; EXTRA_HOSTS="$2"; shift 2 ;;
        --workers) need_value "$@"; WORKERS="$2"; shift 2 ;;
        --pid-file) need_value "$@"; PID_FILE="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; EXTRA_ARGS=("$@"); break ;;
        *) die "unknown argument '$1' (see --help; pass mlflow flags after --)" ;;
    esac
done

[[ "$PORT" =~ ^[0-9]+$ ]] && ((PORT > 0 && PORT < 65536)) || die "port must be 1-65535, got '$PORT'"
[[ "$WORKERS" =~ ^[0-9]+$ ]] && ((WORKERS >= 1)) || die "workers must be >= 1, got '$WORKERS'"

if [[ -n "${OSSNET_MLFLOW:-}" ]]; then
    MLFLOW_BIN="$OSSNET_MLFLOW"
elif [[ -x "$REPO_ROOT/.venv/bin/mlflow" ]]; then
    MLFLOW_BIN="$REPO_ROOT/.venv/bin/mlflow"
else
    MLFLOW_BIN="$(command -v mlflow || true)"
fi
[[ -n "$MLFLOW_BIN" && -x "$MLFLOW_BIN" ]] || die "no 'mlflow' executable (set OSSNET_MLFLOW or create .venv)"

if [[ -z "$BACKEND" ]]; then
    mkdir -p "$HOME_DIR"
    BACKEND="sqlite:///$(cd "$HOME_DIR" && pwd)/mlflow.db"
fi
case "$BACKEND" in
    sqlite:///*)
        db_path="${BACKEND#sqlite:///}"
        [[ "$db_path" == /* ]] || die "backend store URI '$BACKEND': use an absolute path (sqlite:////abs/path.db)"
        mkdir -p "$(dirname "$db_path")" ;;
    postgresql://*|postgresql+*://*|mysql://*|mysql+*://*|mssql+*://*) ;;
    file:*|./*|/*) die "backend store URI '$BACKEND': the file store is not supported by MLflow 3; use sqlite:/// or a database" ;;
    *) die "backend store URI '$BACKEND': expected sqlite:///, postgresql://, mysql:// or mssql+" ;;
esac

if [[ -z "$ARTIFACTS" ]]; then
    ARTIFACTS="$HOME_DIR/mlartifacts"
fi
case "$ARTIFACTS" in
    *://*) ;;  # s3://, gs://, wasbs://, hdfs://, file:// ...
    *)
        mkdir -p "$ARTIFACTS"
        ARTIFACTS="$(cd "$ARTIFACTS" && pwd)" ;;
esac

# MLflow's --allowed-hosts replaces its defaults, so loopback (any port) is always listed;
# the bound address too when it is a specific interface.
ALLOWED="localhost,localhost:*,127.0.0.1,127.0.0.1:*"
case "$HOST" in
    127.0.0.1|localhost|0.0.0.0|::|"") ;;
    *) ALLOWED="$ALLOWED,$HOST,$HOST:*" ;;
esac
if [[ -n "$EXTRA_HOSTS" ]]; then
    EXTRA_HOSTS="$(tr -d '[:space:]' <<<"$EXTRA_HOSTS")"
    ALLOWED="$ALLOWED,$EXTRA_HOSTS"
fi

export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
if [[ -n "${MLFLOW_S3_ENDPOINT_URL:-}" ]]; then
    export MLFLOW_S3_ENDPOINT_URL
fi

if [[ -n "$PID_FILE" ]]; then
    mkdir -p "$(dirname "$PID_FILE")"
    echo "$$" >"$PID_FILE"   # exec keeps this pid
fi

# Store URIs go through the environment (MLflow reads both variables), not the command
# line, so a database password never shows in `ps`.
export MLFLOW_BACKEND_STORE_URI="$BACKEND"
export MLFLOW_ARTIFACTS_DESTINATION="$ARTIFACTS"
echo "mlflow/server.sh: http://$HOST:$PORT backend=${BACKEND%%:*} artifacts=$ARTIFACTS" >&2
exec "$MLFLOW_BIN" server \
    --host "$HOST" \
    --port "$PORT" \
    --workers "$WORKERS" \
    --serve-artifacts \
    --allowed-hosts "$ALLOWED" \
    "${EXTRA_ARGS[@]}"

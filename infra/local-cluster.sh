#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine, bound to 127.0.0.1: one head node and
# OSSNET_CLUSTER_WORKERS worker nodes, each a separate raylet with its own object store.
# It exercises the same path as a remote cluster (Jobs API, runtime_env upload, scheduling
# across nodes) without Kubernetes or a cloud.
#
# Usage: infra/local-cluster.sh start|stop|status|env
#   start   start the cluster (idempotent: a running cluster is left as is)
#   stop    stop it by process id (never touches other Ray instances on the host)
#   status  print the addresses and the node processes; exit 0 running, 3 stopped
#   env     print `export` lines for clients: eval "$(infra/local-cluster.sh env)"
#
# Then: ossnet jobs list --address http://127.0.0.1:8275   (or ossnet train ... --address ...)
#
# Environment (defaults in brackets):
#   OSSNET_CLUSTER_STATE_DIR        pid files, logs, token, cluster.env [<repo>/.ossnet/local-cluster]
#   OSSNET_CLUSTER_WORKERS          worker nodes besides the head [1]
#   OSSNET_CLUSTER_CPUS             logical CPUs per node [2]; logical, so they may exceed the cores
#   OSSNET_CLUSTER_HEAD_CPUS        logical CPUs of the head [OSSNET_CLUSTER_CPUS]
#   OSSNET_CLUSTER_GPUS             GPUs of the first worker node [0]; a host's GPUs can back
#                                   one raylet only, so the head and other workers get none
#   OSSNET_CLUSTER_OBJECT_STORE_MB  object store per node in MB [300]
#   OSSNET_CLUSTER_PORT             GCS port [6390]   (Ray's defaults are left to other clusters)
#   OSSNET_CLUSTER_DASHBOARD_PORT   dashboard / Jobs API port [8275]
#   OSSNET_CLUSTER_CLIENT_PORT      Ray Client server port [10011]
#   OSSNET_CLUSTER_WORKER_PORT_BASE first worker-process port; node i uses base+i*1000.. [20000]
#   OSSNET_CLUSTER_AGENT_PORT_BASE  first agent port; node i (head = 0) uses base+4i..base+4i+3
#                                   for its dashboard agent (HTTP, gRPC), runtime-env agent and
#                                   metrics export [52400]
#   OSSNET_CLUSTER_TEMP_DIR         Ray temp dir, kept short for Unix sockets
#                                   [/tmp/ossnet-ray-<uid>-<port>]
#   OSSNET_CLUSTER_AUTH             token | disabled [token]
#   OSSNET_CLUSTER_START_TIMEOUT    seconds to wait for each node [180]
#   OSSNET_CLUSTER_START_ATTEMPTS   tries per node that dies while starting [3]
#   OSSNET_CLUSTER_DRAIN_TIMEOUT    seconds a node waits on `stop` for its leases to end before
#                                   shutting down [0]; Ray's own default (30) waits for Serve
#                                   replicas to move, and an idle job's leftover lease on the
#                                   head then holds every `stop` for the full 30 s
#   OSSNET_RAY                      the `ray` executable [<repo>/.venv/bin/ray, else PATH]
#
# Authentication: Ray 2.59+ turns token auth on by default, and which token a process uses
# depends on global state (~/.ray/auth_token, RAY_AUTH_* variables). This script therefore
# sets RAY_AUTH_MODE explicitly on every node. With `token` (default) the cluster uses its
# own token in $STATE_DIR/auth_token (mode 600; reused across restarts so client settings
# stay valid); clients send it as `Authorization: Bearer <token>` (pipelines/jobs.py reads
# RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH; `env` prints them). Jobs inherit the setting from
# their raylet, so drivers connect without further configuration. `disabled` is for
# throw-away setups only: anyone who can reach 127.0.0.1 could then run code as you.
#
# Network: the dashboard / Jobs API binds to 127.0.0.1 only. Ray 2.60's `ray start` swaps a
# loopback --node-ip-address for the host's routable IP and its gRPC servers (GCS, raylets,
# agents) listen on all interfaces; token auth is what guards those ports, another reason to
# keep it on.
#
# The cluster uses its own temp dir, so `ray.init()` elsewhere on the host never attaches to
# it by accident, and `ray stop` (which stops every Ray process of the user) is never used.
# `stop` sends SIGTERM to each node's `ray start --block` process (which shuts its children
# down), then SIGKILLs whatever is left in that node's process group or names the temp dir.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${OSSNET_CLUSTER_STATE_DIR:-$REPO_ROOT/.ossnet/local-cluster}"
WORKERS="${OSSNET_CLUSTER_WORKERS:-1}"
CPUS="${OSSNET_CLUSTER_CPUS:-2}"
HEAD_CPUS="${OSSNET_CLUSTER_HEAD_CPUS:-$CPUS}"
GPUS="${OSSNET_CLUSTER_GPUS:-0}"
OBJECT_STORE_MB="${OSSNET_CLUSTER_OBJECT_STORE_MB:-300}"
PORT="${OSSNET_CLUSTER_PORT:-6390}"
DASHBOARD_PORT="${OSSNET_CLUSTER_DASHBOARD_PORT:-8275}"
CLIENT_PORT="${OSSNET_CLUSTER_CLIENT_PORT:-10011}"
WORKER_PORT_BASE="${OSSNET_CLUSTER_WORKER_PORT_BASE:-20000}"
AGENT_PORT_BASE="${OSSNET_CLUSTER_AGENT_PORT_BASE:-52400}"
TEMP_DIR="${OSSNET_CLUSTER_TEMP_DIR:-/tmp/ossnet-ray-$(id -u)-$PORT}"
AUTH_MODE="${OSSNET_CLUSTER_AUTH:-token}"
START_TIMEOUT="${OSSNET_CLUSTER_START_TIMEOUT:-180}"
START_ATTEMPTS="${OSSNET_CLUSTER_START_ATTEMPTS:-3}"
DRAIN_TIMEOUT="${OSSNET_CLUSTER_DRAIN_TIMEOUT:-0}"
HOST=127.0.0.1

die() { echo "local-cluster: $*" >&2; exit 1; }
log() { echo "local-cluster: $*" >&2; }

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
for var in WORKERS CPUS HEAD_CPUS GPUS OBJECT_STORE_MB PORT DASHBOARD_PORT CLIENT_PORT \
    WORKER_PORT_BASE AGENT_PORT_BASE START_TIMEOUT START_ATTEMPTS DRAIN_TIMEOUT; do
    is_uint "${!var}" || die "OSSNET_CLUSTER_${var} must be a non-negative integer, got '${!var}'"
done
[[ "$AUTH_MODE" == token || "$AUTH_MODE" == disabled ]] \
    || die "OSSNET_CLUSTER_AUTH must be 'token' or 'disabled', got '$AUTH_MODE'"
STOP_GRACE=$((DRAIN_TIMEOUT + 30))   # a node's drain, then its own shutdown
(( WORKERS >= 1 )) || die "OSSNET_CLUSTER_WORKERS must be at least 1 (a multi-node cluster)"
(( OBJECT_STORE_MB >= 80 )) || die "OSSNET_CLUSTER_OBJECT_STORE_MB must be at least 80 (Ray's minimum)"
(( ${#TEMP_DIR} <= 40 )) \
    || die "OSSNET_CLUSTER_TEMP_DIR '$TEMP_DIR' is too long for Ray's Unix socket paths (max 40 chars)"

if [[ -n "${OSSNET_RAY:-}" ]]; then
    RAY_BIN="$OSSNET_RAY"
elif [[ -x "$REPO_ROOT/.venv/bin/ray" ]]; then
    RAY_BIN="$REPO_ROOT/.venv/bin/ray"
else
    RAY_BIN="$(command -v ray || true)"
fi
[[ -n "$RAY_BIN" && -x "$RAY_BIN" ]] || die "no 'ray' executable (set OSSNET_RAY or create .venv)"

ADDRESS="http://$HOST:$DASHBOARD_PORT"
GCS_ADDRESS="$HOST:$PORT"
TOKEN_PATH="$STATE_DIR/auth_token"

node_names() {
    echo head
    local i
    for ((i = 1; i <= WORKERS; i++)); do echo "worker$i"; done
}

pid_alive() {  # running and not a zombie
    local stat
    [[ -n "$1" ]] && read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    stat="${stat##*) }"
    [[ "${stat:0:1}" != Z ]]
}

# A recorded node pid, only if that process is still our `ray start` (its command line names
# our temp dir): a stale pid file must never make us signal a recycled pid.
node_pid() {
    local pid="" args arg
    read -r pid 2>/dev/null <"$STATE_DIR/$1.pid" || true
    [[ -n "$pid" ]] && mapfile -d '' args 2>/dev/null <"/proc/$pid/cmdline" || return 0
    for arg in "${args[@]}"; do
        [[ "$arg" == "--temp-dir=$TEMP_DIR" ]] && { echo "$pid"; return 0; }
    done
    return 0
}

port_in_use() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# Pids of processes of this user whose command line names our temp dir: every Ray process of
# this cluster does (session dir, sockets, logs), and no other cluster can, so this is the
# scoped fallback for stragglers that left the process groups.
cluster_pids() {
    local dir pid args
    for dir in /proc/[0-9]*; do
        pid="${dir#/proc/}"
        [[ -O "$dir" ]] || continue
        # Builtins only: a grep child would see the pattern in its own command line.
        mapfile -d '' args 2>/dev/null <"$dir/cmdline" || continue
        [[ "${args[*]:-}" == *"$TEMP_DIR/"* ]] && echo "$pid"
    done
    return 0
}

# Pids whose process group is $1 (the `ray start --block` leader we started with setsid).
group_pids() {
    local pgid="$1" dir stat rest state ppid pg
    for dir in /proc/[0-9]*; do
        read -r stat 2>/dev/null <"$dir/stat" || continue
        rest="${stat##*) }"            # fields after "pid (comm) "
        read -r state ppid pg _ <<<"$rest"
        [[ "$pg" == "$pgid" && "$state" != Z ]] && echo "${dir#/proc/}"
    done
    return 0
}

ray_env() {
    # Node processes (and the jobs they run) inherit this environment.
    unset RAY_ADDRESS RAY_AUTH_TOKEN
    export RAY_AUTH_MODE="$AUTH_MODE"
    if [[ "$AUTH_MODE" == token ]]; then
        export RAY_AUTH_TOKEN_PATH="$TOKEN_PATH"
    else
        unset RAY_AUTH_TOKEN_PATH
    fi
    export RAY_USAGE_STATS_ENABLED=0
    # Read by each `ray start --block` when `stop` sends it SIGTERM.
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="$DRAIN_TIMEOUT"
    # Jobs run `python ...` entrypoints: make that the interpreter Ray runs under.
    export PATH="$(dirname "$RAY_BIN"):$PATH"
}

ensure_token() {
    [[ "$AUTH_MODE" == token ]] || return 0
    if [[ ! -s "$TOKEN_PATH" ]]; then
        (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$TOKEN_PATH")
    fi
    chmod 600 "$TOKEN_PATH"
    # The header goes to curl from a file (-H @file), so the token never shows in `ps`.
    (umask 077 && echo "Authorization: Bearer $(cat "$TOKEN_PATH")" >"$STATE_DIR/auth_header")
}

curl_api() {
    local args=(-fsS --max-time 5)
    [[ "$AUTH_MODE" == token && -s "$STATE_DIR/auth_header" ]] \
        && args+=(-H "@$STATE_DIR/auth_header")
    curl "${args[@]}" "$ADDRESS$1"
}

alive_node_count() {
    # State API: one JSON object per node with "state": "ALIVE".
    curl_api "/api/v0/nodes?limit=100" 2>/dev/null | grep -o '"state": *"ALIVE"' | wc -l
}

launch_node() {
    local name="$1"; shift
    rm -f "$STATE_DIR/$name.pid"
    # setsid: the node gets its own process group, so `stop` can reach every child by the
    # leader's pid. The inner shell records its own pid, then execs ray (same pid).
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$STATE_DIR/$name.pid" \
        "$RAY_BIN" start "$@" --block --disable-usage-stats \
        </dev/null >"$STATE_DIR/$name.log" 2>&1 &
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -s "$STATE_DIR/$name.pid" ]] && return 0
        sleep 0.1
    done
    die "$name did not start (see $STATE_DIR/$name.log)"
}

wait_until() {  # description, timeout, command...
    local what="$1" timeout="$2"; shift 2
    local deadline=$((SECONDS + timeout)) name
    until "$@"; do
        for name in $(node_names); do
            if [[ -f "$STATE_DIR/$name.pid" ]] && ! pid_alive "$(node_pid "$name")"; then
                tail -n 20 "$STATE_DIR/$name.log" >&2 || true
                stop_cluster >/dev/null 2>&1 || true
                die "$name exited while waiting for $what (log: $STATE_DIR/$name.log)"
            fi
        done
        if ((SECONDS >= deadline)); then
            stop_cluster >/dev/null 2>&1 || true
            die "timed out after ${timeout}s waiting for $what (logs in $STATE_DIR)"
        fi
        sleep 1
    done
}

# Wait for one starting node: 0 once `ready` holds, 1 if the node's process died first.
await_node() {  # name, what, ready command...
    local name="$1" what="$2"; shift 2
    local deadline=$((SECONDS + START_TIMEOUT))
    until "$@"; do
        pid_alive "$(node_pid "$name")" || return 1
        if ((SECONDS >= deadline)); then
            stop_cluster >/dev/null 2>&1 || true
            die "timed out after ${START_TIMEOUT}s waiting for $what (logs in $STATE_DIR)"
        fi
        sleep 1
    done
}

# Start a node, retrying when it dies during startup: `ray start` gives a raylet a fixed 30 s
# to register with the GCS, which an oversubscribed machine can miss.
start_node() {  # name, what, ready command, ready argument, -- ray start args...
    local name="$1" what="$2" ready="$3" ready_arg="$4"; shift 5
    local attempt pgid
    for ((attempt = 1; attempt <= START_ATTEMPTS; attempt++)); do
        launch_node "$name" "$@"
        await_node "$name" "$what" "$ready" "$ready_arg" && return 0
        log "$name died during startup (attempt $attempt/$START_ATTEMPTS): $(tail -n 1 "$STATE_DIR/$name.log")"
        cp "$STATE_DIR/$name.log" "$STATE_DIR/$name.attempt$attempt.log"
        read -r pgid 2>/dev/null <"$STATE_DIR/$name.pid" || pgid=""
        [[ -n "$pgid" && -n "$(group_pids "$pgid")" ]] && kill -KILL -- "-$pgid" 2>/dev/null
        rm -f "$STATE_DIR/$name.pid"
    done
    stop_cluster >/dev/null 2>&1 || true
    die "$name failed to start $START_ATTEMPTS times (logs: $STATE_DIR/$name.attempt*.log)"
}

head_ready() { curl -fsS --max-time 5 "$ADDRESS/api/gcs_healthz" >/dev/null 2>&1 && : "$1"; }
jobs_api_ready() { curl_api "/api/jobs/" >/dev/null 2>&1; }
nodes_alive() { (( $(alive_node_count) >= $1 )); }

running() {
    local name any=1
    for name in $(node_names); do
        pid_alive "$(node_pid "$name")" && any=0
    done
    return $any
}

write_state() {
    cat >"$STATE_DIR/cluster.env" <<EOF
OSSNET_CLUSTER_ADDRESS=$ADDRESS
OSSNET_CLUSTER_GCS_ADDRESS=$GCS_ADDRESS
OSSNET_CLUSTER_DASHBOARD_URL=$ADDRESS
OSSNET_CLUSTER_TEMP_DIR=$TEMP_DIR
OSSNET_CLUSTER_AUTH=$AUTH_MODE
OSSNET_CLUSTER_TOKEN_PATH=$([[ "$AUTH_MODE" == token ]] && echo "$TOKEN_PATH")
OSSNET_CLUSTER_NODES=$(node_names | tr '\n' ' ' | sed 's/ $//')
EOF
}

# Fixed agent ports per node. With port 0 the raylet waits a hard-coded 15 s for each agent
# to report the port it picked and aborts when a busy machine misses that; Ray's defaults
# (52365, ...) would collide between nodes on one host and with other Ray instances.
agent_ports() {  # node index -> ray start flags
    local b=$((AGENT_PORT_BASE + 4 * $1))
    echo "--dashboard-agent-listen-port=$b --dashboard-agent-grpc-port=$((b + 1))" \
        "--runtime-env-agent-port=$((b + 2)) --metrics-export-port=$((b + 3))"
}

start_cluster() {
    mkdir -p "$STATE_DIR" "$TEMP_DIR"
    if running; then
        log "already running"
        print_status
        return 0
    fi
    stop_cluster >/dev/null 2>&1 || true   # clear a half-dead previous start
    local port
    for port in "$PORT" "$DASHBOARD_PORT" "$CLIENT_PORT" \
        $(seq "$AGENT_PORT_BASE" "$((AGENT_PORT_BASE + 4 * WORKERS + 3))"); do
        port_in_use "$port" && die "port $port on $HOST is in use (set OSSNET_CLUSTER_*PORT*)"
    done
    command -v curl >/dev/null || die "curl is required"
    ensure_token
    ray_env
    local bytes=$((OBJECT_STORE_MB * 1024 * 1024))
    log "starting head on $GCS_ADDRESS (dashboard $ADDRESS, auth $AUTH_MODE)"
    # shellcheck disable=SC2046  # agent_ports emits separate flags
    start_node head "the head node" head_ready - -- --head --node-ip-address="$HOST" \
        --port="$PORT" --dashboard-host="$HOST" --dashboard-port="$DASHBOARD_PORT" \
        --include-dashboard=true --ray-client-server-port="$CLIENT_PORT" \
        --num-cpus="$HEAD_CPUS" --num-gpus=0 --object-store-memory="$bytes" \
        --temp-dir="$TEMP_DIR" $(agent_ports 0) \
        --min-worker-port="$WORKER_PORT_BASE" --max-worker-port="$((WORKER_PORT_BASE + 999))"
    local i gpus
    for ((i = 1; i <= WORKERS; i++)); do
        gpus=0
        ((i == 1)) && gpus="$GPUS"
        log "starting worker$i"
        # One node at a time: nodes starting together in one session dir race for the same
        # socket and log names (raylet.1), and one of them dies with "Address already in use".
        # shellcheck disable=SC2046
        start_node "worker$i" "worker$i to join" nodes_alive "$((i + 1))" -- \
            --address="$GCS_ADDRESS" --node-ip-address="$HOST" \
            --num-cpus="$CPUS" --num-gpus="$gpus" --object-store-memory="$bytes" \
            --temp-dir="$TEMP_DIR" $(agent_ports "$i") \
            --min-worker-port="$((WORKER_PORT_BASE + i * 1000))" \
            --max-worker-port="$((WORKER_PORT_BASE + i * 1000 + 999))"
    done
    wait_until "the Jobs API" "$START_TIMEOUT" jobs_api_ready
    write_state
    print_status
}

stop_cluster() {
    local name names pid pids=() deadline
    names="$(node_names | tac)"
    # Also stop nodes recorded by a start with a larger OSSNET_CLUSTER_WORKERS.
    for name in "$STATE_DIR"/worker*.pid; do
        [[ -e "$name" ]] || continue
        name="$(basename "$name" .pid)"
        grep -qx "$name" <<<"$names" || names="$name"$'\n'"$names"
    done
    # SIGTERM lets each `ray start --block` shut its raylet/GCS/dashboard down in order;
    # workers first, so they do not spend the grace period retrying a vanished GCS.
    for name in $names; do
        pid="$(node_pid "$name")"
        [[ -n "$pid" ]] || continue
        pids+=("$pid")
        pid_alive "$pid" && kill -TERM "$pid" 2>/dev/null || true
    done
    deadline=$((SECONDS + STOP_GRACE))
    for pid in "${pids[@]}"; do
        while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    done
    local left
    for pid in "${pids[@]}"; do
        left="$(group_pids "$pid")"
        if [[ -n "$left" ]]; then
            log "killing leftover processes of group $pid: $(echo $left)"
            kill -KILL -- "-$pid" 2>/dev/null || true
        fi
    done
    for name in $names; do rm -f "$STATE_DIR/$name.pid"; done
    local stray
    deadline=$((SECONDS + 10))
    stray="$(cluster_pids)"
    while [[ -n "$stray" ]] && ((SECONDS < deadline)); do
        sleep 0.5
        stray="$(cluster_pids)"
    done
    if [[ -n "$stray" ]]; then
        log "killing stray processes of this cluster: $(echo $stray)"
        kill -KILL $stray 2>/dev/null || true
    fi
    rm -f "$STATE_DIR/cluster.env"
    log "stopped"
}

print_status() {
    local name pid state rc=0
    if ! running; then
        echo "stopped (state dir $STATE_DIR)"
        return 3
    fi
    echo "address:    $ADDRESS   (ossnet ... --address $ADDRESS)"
    echo "dashboard:  $ADDRESS"
    echo "gcs:        $GCS_ADDRESS   (ray.init(address=\"$GCS_ADDRESS\"))"
    if [[ "$AUTH_MODE" == token ]]; then
        echo "auth:       token (RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN_PATH)"
    else
        echo "auth:       disabled"
    fi
    for name in $(node_names); do
        pid="$(node_pid "$name")"
        if pid_alive "$pid"; then state=running; else state=dead; rc=1; fi
        echo "node:       $name pid=${pid:-none} $state"
    done
    echo "alive nodes (Ray): $(alive_node_count)"
    return $rc
}

print_env() {
    echo "export RAY_API_SERVER_ADDRESS=$ADDRESS"
    echo "export RAY_AUTH_MODE=$AUTH_MODE"
    if [[ "$AUTH_MODE" == token ]]; then
        echo "export RAY_AUTH_TOKEN_PATH=$TOKEN_PATH"
    fi
}

case "${1:-}" in
    start) start_cluster ;;
    stop) stop_cluster ;;
    status) print_status ;;
    env) print_env ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Starts the msys stack, natively or with Docker Compose, in the seed's order: PostgreSQL for users
# (127.0.0.1:5434) and orders (5435), the Kafka broker (9093) with user-events and its dead-letter
# topic, then the roles user, order, monitor and frontend, each one healthy before the next starts.
# Idempotent: pieces already running are left alone, missing ones (e.g. after kill -9) are started
# again. Data survives scripts/stop.sh.
#
# usage: scripts/start.sh [--mode auto|native|compose] [--no-build]
#   --mode auto       (default) compose when a Docker engine answers (`docker info`), else native
#   --mode native     PostgreSQL (Debian's), nisshi as the broker, msys processes; on the first run
#                     it builds nisshi (into ~/.cache/msys) and msys at the same time
#   --mode compose    `docker compose up` of compose.yaml (builds the image; see deploy/README.md)
#   --no-build        native: use the existing release binary instead of running cargo build --release
# environment:
#   MSYS_BIN          msys binary to run natively (implies --no-build)
#   MSYS_ROLES        roles to start, in order (default: "user order monitor frontend"); a role whose
#                     subcommand this binary does not implement yet is skipped with a note
#   MSYS_STATE_DIR    data, logs and pid files (default /var/lib/msys as root, else
#                     ~/.local/state/msys)
#   USER_POSTGRES_PORT, ORDER_POSTGRES_PORT, KAFKA_PORT, USER_SERVICE_PORT, ORDER_SERVICE_PORT,
#   MONITOR_SERVICE_PORT, FRONTEND_PORT, USER_EVENTS_TOPIC override the seed's values;
#   MSYS_LISTEN_HOST (default 127.0.0.1) is the interface the roles bind.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# The roles to run, in start order; a new role is one more word here.
ROLES=${MSYS_ROLES:-"user order monitor frontend"}
ROLE_TIMEOUT=${MSYS_ROLE_TIMEOUT:-60}

# Least privilege: the roles log in as msys_app (rows only); `msys migrate` runs as the owner, postgres.
export USER_POSTGRES_HOST=127.0.0.1 USER_POSTGRES_USER=msys_app USER_POSTGRES_PASSWORD=msys_app
export USER_POSTGRES_PORT=${USER_POSTGRES_PORT:-5434} USER_POSTGRES_DB=${USER_POSTGRES_DB:-users_db}
export ORDER_POSTGRES_HOST=127.0.0.1 ORDER_POSTGRES_USER=msys_app ORDER_POSTGRES_PASSWORD=msys_app
export ORDER_POSTGRES_PORT=${ORDER_POSTGRES_PORT:-5435} ORDER_POSTGRES_DB=${ORDER_POSTGRES_DB:-orders_db}
export KAFKA_HOST=127.0.0.1 KAFKA_PORT=${KAFKA_PORT:-9093} USER_EVENTS_TOPIC=${USER_EVENTS_TOPIC:-user-events}
export USER_SERVICE_PORT=${USER_SERVICE_PORT:-50051} ORDER_SERVICE_PORT=${ORDER_SERVICE_PORT:-50052}
export MONITOR_SERVICE_PORT=${MONITOR_SERVICE_PORT:-50053} FRONTEND_PORT=${FRONTEND_PORT:-80}
export USER_EVENTS_DLQ_TOPIC=${USER_EVENTS_DLQ_TOPIC:-$USER_EVENTS_TOPIC.dlq}
# The monitor watches the two services; the frontend reads the monitor (the contract's variables).
export MONITOR_USER_ADDR=${MONITOR_USER_ADDR:-http://127.0.0.1:$USER_SERVICE_PORT}
export MONITOR_ORDER_ADDR=${MONITOR_ORDER_ADDR:-http://127.0.0.1:$ORDER_SERVICE_PORT}
export MONITOR_ADDR=${MONITOR_ADDR:-http://127.0.0.1:$MONITOR_SERVICE_PORT}
# Like the databases and the broker, the roles stay on loopback unless asked otherwise.
export MSYS_LISTEN_HOST=${MSYS_LISTEN_HOST:-127.0.0.1}

# Port each role serves on (the seed's numbers unless overridden).
role_port() {
  case $1 in
    user) echo "$USER_SERVICE_PORT" ;;
    order) echo "$ORDER_SERVICE_PORT" ;;
    monitor) echo "$MONITOR_SERVICE_PORT" ;;
    frontend) echo "$FRONTEND_PORT" ;;
    *) die "unknown role '$1' in MSYS_ROLES" ;;
  esac
}

# gRPC roles answer grpc.health.v1 (SERVING only); the frontend is a web page.
role_healthy() {
  case $1 in
    frontend) curl -fsS -o /dev/null "http://127.0.0.1:$2/healthz" 2>/dev/null ;;
    # Ready, not just alive: the order service reports SERVING once its consumer joined its group.
    order) "$MSYS_BIN" health "127.0.0.1:$2" --service msys.v1.OrderService >/dev/null 2>&1 ;;
    *) "$MSYS_BIN" health "127.0.0.1:$2" >/dev/null 2>&1 ;;
  esac
}

# Fails before anything starts if this binary lacks the events commands. A role whose
# subcommand exists but takes no --port yet (a placeholder that only says "not implemented") is
# dropped from ROLES with a note, so this script works before and after that role lands.
check_binary() {
  local role help kept=()
  "$MSYS_BIN" events --help >/dev/null 2>&1 || die "$MSYS_BIN has no 'events' command (msys events --help failed)"
  for role in $ROLES; do
    help=$("$MSYS_BIN" "$role" --help 2>&1) ||
      die "$MSYS_BIN has no '$role' command (msys $role --help failed); set MSYS_ROLES to the roles it has"
    if [[ $help == *--port* ]]; then
      kept+=("$role")
    else
      log "skipping $role: this msys does not implement 'msys $role' yet (no --port in msys $role --help)"
    fi
  done
  ROLES="${kept[*]}"
}

# Starts the broker and makes sure the events topic and its dead-letter topic exist with 3
# partitions before any client can auto-create them with the broker's default of 4.
start_kafka() {
  local out topic
  start_nisshi "$STATE/kafka" "$KAFKA_PORT" "$LOGS/kafka.log" "$RUN/kafka.pid"
  wait_until 30 "$MSYS_BIN" events list-topics >/dev/null 2>&1 ||
    die_with_log "$LOGS/kafka.log" "msys events list-topics fails against 127.0.0.1:$KAFKA_PORT"
  for topic in "$USER_EVENTS_TOPIC" "$USER_EVENTS_DLQ_TOPIC"; do
    out=$("$MSYS_BIN" events create-topic --topic "$topic" --partitions 3 --replication-factor 1 2>&1) ||
      die "msys events create-topic $topic failed: $out (broker log: $LOGS/kafka.log)"
  done
  out=$("$MSYS_BIN" events list-topics 2>&1) || die "msys events list-topics failed: $out"
  awk -v t="$USER_EVENTS_TOPIC" '$1 == t && $2 == 3 { found = 1 } END { exit !found }' <<<"$out" ||
    die "topic $USER_EVENTS_TOPIC does not have 3 partitions (list-topics says: $(grep "^$USER_EVENTS_TOPIC" <<<"$out" || echo nothing)); stop, delete $STATE/kafka and start again"
}

# Starts one role unless its pid file's process runs, then waits until it reports healthy.
start_role() {
  local role=$1 port pidfile=$RUN/role-$1.pid logf=$LOGS/$1.log
  port=$(role_port "$role")
  if pid_alive "$pidfile" "msys $role"; then
    log "$role already running (pid $(<"$pidfile")) on 127.0.0.1:$port"
    if [[ $MSYS_BIN -nt $pidfile ]]; then
      warn "$MSYS_BIN is newer than the running $role; scripts/stop.sh && scripts/start.sh to run it"
    fi
  else
    port_open "$port" && die "cannot start $role: 127.0.0.1:$port is taken by another process"
    start_daemon "$pidfile" "$logf" "$STATE" "$MSYS_BIN" "$role" --port "$port"
  fi
  wait_until "$ROLE_TIMEOUT" daemon_check "$pidfile" "msys $role" "$logf" role_healthy "$role" "$port" ||
    die_with_log "$logf" "$role is not healthy on 127.0.0.1:$port after ${ROLE_TIMEOUT}s"
}

# Creates the application role msys_app if missing, then migrates `$1` (user|order) on port `$2`
# as the schema owner and grants msys_app DML rights, and nothing more; then, as the superuser,
# pg_stat_statements and pg_monitor for the monitor's figures (an extension needs the superuser).
prepare_database() {
  local out sql="DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'msys_app')
    THEN CREATE ROLE msys_app LOGIN PASSWORD 'msys_app'; END IF; END \$\$"
  out=$(PGPASSWORD=postgres psql -h 127.0.0.1 -p "$2" -U postgres -d postgres -qAt -v ON_ERROR_STOP=1 -c "$sql" 2>&1) ||
    die "creating the role msys_app on 127.0.0.1:$2 failed: $out"
  out=$(USER_POSTGRES_USER=postgres USER_POSTGRES_PASSWORD=postgres ORDER_POSTGRES_USER=postgres \
    ORDER_POSTGRES_PASSWORD=postgres "$MSYS_BIN" migrate "$1" --grant-to msys_app 2>&1) ||
    die "msys migrate $1 failed: $out"
  local db=$USER_POSTGRES_DB
  [[ $1 == order ]] && db=$ORDER_POSTGRES_DB
  out=$(PGPASSWORD=postgres psql -h 127.0.0.1 -p "$2" -U postgres -d "$db" -qAt -v ON_ERROR_STOP=1 \
    -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; GRANT pg_monitor TO msys_app" 2>&1) ||
    die "creating pg_stat_statements in $db on 127.0.0.1:$2 failed: $out"
}

# One aligned line of the summary: piece, address, where its data and log are.
summary_row() { printf '  %-16s %-16s %s\n' "$@"; }

# Where everything is, so nobody has to read this script to find a log.
print_summary() {
  local role
  printf '\nmsys is up (mode: native); state in %s\n' "$STATE"
  summary_row "piece" "address" "data / log"
  summary_row "postgres users" "127.0.0.1:$USER_POSTGRES_PORT" "$STATE/pg/users  $LOGS/postgres-users.log"
  summary_row "postgres orders" "127.0.0.1:$ORDER_POSTGRES_PORT" "$STATE/pg/orders  $LOGS/postgres-orders.log"
  summary_row "kafka (nisshi)" "127.0.0.1:$KAFKA_PORT" "$STATE/kafka  $LOGS/kafka.log  (topics $USER_EVENTS_TOPIC, $USER_EVENTS_DLQ_TOPIC; 3 partitions)"
  for role in $ROLES; do
    summary_row "$role" "127.0.0.1:$(role_port "$role")" "$LOGS/$role.log  (pid $(<"$RUN/role-$role.pid"))"
  done
  cat <<EOF
  psql:    PGPASSWORD=postgres psql -h 127.0.0.1 -p $USER_POSTGRES_PORT -U postgres $USER_POSTGRES_DB
  events:  KAFKA_PORT=$KAFKA_PORT $MSYS_BIN events tail --from-beginning
  health:  $MSYS_BIN health 127.0.0.1:$USER_SERVICE_PORT
  metrics: curl http://127.0.0.1:${USER_METRICS_PORT:-9451}/metrics   (order: ${ORDER_METRICS_PORT:-9452})
  stop:    $MSYS_ROOT/scripts/stop.sh   (keeps the data; delete $STATE to start from scratch)
EOF
}

# The Compose path: the same system from compose.yaml, one container per piece, waiting until
# every role reports healthy (docker compose v2's --wait; with docker-compose 1.29 by polling).
start_compose() {
  local -a compose
  local role id status
  read -ra compose <<<"$(compose_command)"
  ((${#compose[@]})) || die "neither 'docker compose' nor docker-compose is installed"
  log "starting with ${compose[*]} and $MSYS_ROOT/compose.yaml (builds the msys image the first time)"
  echo compose >"$RUN/mode"
  if [[ ${compose[0]} == docker ]]; then
    (cd "$MSYS_ROOT" && "${compose[@]}" up -d --build --wait --wait-timeout 900) || die "${compose[*]} up failed (output above)"
  else
    (cd "$MSYS_ROOT" && "${compose[@]}" up -d --build) || die "${compose[*]} up failed (output above)"
    for role in user order monitor frontend; do
      id=$(cd "$MSYS_ROOT" && "${compose[@]}" ps -q "$role")
      wait_until 600 compose_healthy "$id" || {
        status=$(docker inspect -f '{{.State.Health.Status}}' "$id" 2>&1 || true)
        die "$role is not healthy in compose after 600s ($status); see: ${compose[*]} logs $role"
      }
    done
  fi
  printf '\nmsys is up (mode: compose, %s)\n' "$MSYS_ROOT/compose.yaml"
  summary_row "user" "127.0.0.1:$USER_SERVICE_PORT" "gRPC"
  summary_row "order" "127.0.0.1:$ORDER_SERVICE_PORT" "gRPC"
  summary_row "monitor" "127.0.0.1:$MONITOR_SERVICE_PORT" "gRPC"
  summary_row "frontend" "127.0.0.1:$FRONTEND_PORT" "http://127.0.0.1:$FRONTEND_PORT/"
  summary_row "postgres" "127.0.0.1:$USER_POSTGRES_PORT" "users; orders on 127.0.0.1:$ORDER_POSTGRES_PORT"
  summary_row "kafka" "127.0.0.1:$KAFKA_PORT" "topics $USER_EVENTS_TOPIC, $USER_EVENTS_DLQ_TOPIC"
  printf '  status:  %s ps   logs: %s logs -f ROLE\n' "${compose[*]}" "${compose[*]}"
  printf '  stop:    %s/scripts/stop.sh   (keeps the volumes; %s down -v drops them)\n' "$MSYS_ROOT" "${compose[*]}"
}

compose_healthy() { [[ $(docker inspect -f '{{.State.Health.Status}}' "$1" 2>/dev/null) == healthy ]]; }

main() {
  local build=build mode=auto role
  while (($#)); do
    case $1 in
      --no-build) build=no-build ;;
      --mode)
        mode=${2:-}
        shift
        ;;
      --mode=*) mode=${1#--mode=} ;;
      -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        return 0
        ;;
      *) die "unknown argument '$1' (try --help)" ;;
    esac
    shift
  done
  case $mode in
    auto)
      if docker_engine_reachable; then
        mode=compose
        log "mode auto: a Docker engine answers, so compose"
      else
        mode=native
        log "mode auto: no Docker engine answers 'docker info', so native"
      fi
      ;;
    native | compose) ;;
    *) die "unknown mode '$mode': auto, native or compose" ;;
  esac
  STATE=$(msys_state_dir)
  mkdir -p "$STATE"
  STATE=$(cd "$STATE" && pwd)
  LOGS=$STATE/log RUN=$STATE/run
  mkdir -p "$LOGS" "$RUN" "$STATE/pg" "$STATE/kafka"
  chmod 755 "$STATE" "$STATE/pg"

  if [[ $mode == compose ]]; then
    docker_engine_reachable || die "--mode compose needs a Docker engine, and 'docker info' fails; try --mode native"
    start_compose
    return 0
  fi
  echo native >"$RUN/mode"
  ensure_packages initdb:postgresql
  # The dashboard's web bundle, embedded by the msys build that follows (frontend task).
  if [[ $build == build && -z ${MSYS_BIN:-} && -x $MSYS_ROOT/scripts/build-frontend.sh ]]; then
    timed "frontend bundle" "$MSYS_ROOT/scripts/build-frontend.sh"
  fi
  ensure_native_binaries "$build"
  check_binary

  timed "postgres users" pg_start_cluster "$STATE/pg/users" "$USER_POSTGRES_PORT" \
    "$MSYS_ROOT/config/postgres/users.conf" "$LOGS/postgres-users.log"
  timed "postgres orders" pg_start_cluster "$STATE/pg/orders" "$ORDER_POSTGRES_PORT" \
    "$MSYS_ROOT/config/postgres/orders.conf" "$LOGS/postgres-orders.log"
  timed "migrate users" prepare_database user "$USER_POSTGRES_PORT"
  timed "migrate orders" prepare_database order "$ORDER_POSTGRES_PORT"
  timed "kafka" start_kafka
  for role in $ROLES; do
    timed "role $role" start_role "$role"
  done
  print_summary
}

main "$@"

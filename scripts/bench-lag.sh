#!/usr/bin/env bash
# Measures the event lag of the order side: from the moment a user change is written (its outbox
# row's occurred_at, in the same statement as the change) to the moment the order role applied it
# (applied_events.applied_at), at a steady CreateUser rate. Throwaway stack: both PostgreSQL
# clusters with the seed's tuning, a nisshi broker, `msys user` and `msys order` (release builds),
# on free ports, torn down afterwards. Prints figures; asserts nothing.
#
# usage: scripts/bench-lag.sh
# environment:
#   MSYS_BIN              msys binary to run instead of a cargo release build
#   MSYS_LAG_RATE         CreateUser requests per second (default 200)
#   MSYS_LAG_SECONDS      length of the paced run (default 20)
#   MSYS_KEEP_TMP=1       keep the temporary directory (data and logs)
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RATE=${MSYS_LAG_RATE:-200}
RUN_SECONDS=${MSYS_LAG_SECONDS:-20}
TMP=
LOAD_BIN=

# shellcheck disable=SC2317  # the EXIT trap
# Best effort: stops everything this run started, whatever state the run died in.
teardown() {
  local status=$?
  trap - EXIT INT TERM
  set +e
  if [[ -n $TMP ]]; then
    log "tearing down $TMP"
    (stop_daemon "msys order" "$TMP/run/order.pid" "msys order" 20)
    (stop_daemon "msys user" "$TMP/run/user.pid" "msys user" 20)
    (stop_daemon broker "$TMP/run/kafka.pid" nisshi 10)
    (pg_stop_cluster "$TMP/pg/users" immediate)
    (pg_stop_cluster "$TMP/pg/orders" immediate)
    if [[ ${MSYS_KEEP_TMP:-} == 1 ]]; then log "kept $TMP (MSYS_KEEP_TMP=1)"; else rm -rf "$TMP"; fi
  fi
  print_timings
  exit "$status"
}

# A SQL query against the orders database, one unaligned row.
orders_sql() {
  PGPASSWORD=postgres "$PG_BINDIR/psql" -h 127.0.0.1 -p "$ORDERS_PG" -U postgres -d orders_db -XAtq -F ' ' -c "$1"
}

users_sql() {
  PGPASSWORD=postgres "$PG_BINDIR/psql" -h 127.0.0.1 -p "$USERS_PG" -U postgres -d users_db -XAtq -c "$1"
}

# True once the order side has applied as many events as the user side wrote.
caught_up() {
  local written applied
  written=$(users_sql 'SELECT count(*) FROM user_outbox' 2>/dev/null) || return 1
  applied=$(orders_sql 'SELECT count(*) FROM applied_events' 2>/dev/null) || return 1
  [[ -n $written && $written -gt 0 && $written == "$applied" ]]
}

# Starts one role from the same binary, healthy before returning.
start_role() {
  local role=$1 port=$2 pidfile=$TMP/run/$1.pid logf=$TMP/log/$1.log
  start_daemon "$pidfile" "$logf" "$TMP/run" env USER_POSTGRES_PORT="$USERS_PG" USER_POSTGRES_DB=users_db \
    ORDER_POSTGRES_PORT="$ORDERS_PG" ORDER_POSTGRES_DB=orders_db KAFKA_HOST=127.0.0.1 KAFKA_PORT="$KAFKA_PORT" \
    MSYS_LISTEN_HOST=127.0.0.1 "$MSYS_BIN" "$role" --port "$port" --metrics-port 0
  # shellcheck disable=SC2317  # called through wait_until
  healthy() { "$MSYS_BIN" health "127.0.0.1:$1" >/dev/null 2>&1; }
  wait_until 60 daemon_check "$pidfile" "msys $role" "$logf" healthy "$port" ||
    die_with_log "$logf" "msys $role not healthy on 127.0.0.1:$port after 60s"
}

main() {
  local warm line
  trap teardown EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  timed "packages" ensure_packages initdb:postgresql
  timed "nisshi" ensure_nisshi
  find_pg_bindir || die "PostgreSQL binaries not found after installing postgresql"
  timed "build" build_msys_and_load

  make_throwaway_dir TMP msys-lag
  free_port USERS_PG
  timed "postgres users" pg_start_cluster "$TMP/pg/users" "$USERS_PG" \
    "$MSYS_ROOT/config/postgres/users.conf" "$TMP/log/postgres-users.log"
  free_port ORDERS_PG
  timed "postgres orders" pg_start_cluster "$TMP/pg/orders" "$ORDERS_PG" \
    "$MSYS_ROOT/config/postgres/orders.conf" "$TMP/log/postgres-orders.log"
  free_port KAFKA_PORT
  timed "broker" start_nisshi "$TMP/kafka" "$KAFKA_PORT" "$TMP/log/kafka.log" "$TMP/run/kafka.pid"
  create_user_events_topic "$KAFKA_PORT" "$TMP/log/kafka.log"
  free_port USER_PORT
  timed "msys user" start_role user "$USER_PORT"
  free_port ORDER_PORT
  timed "msys order" start_role order "$ORDER_PORT"

  # Warm-up: a few users, until the order side has its partitions and applied them all.
  "$LOAD_BIN" create --addr "http://127.0.0.1:$USER_PORT" --concurrency 1 --seconds 2 --rate 5 >/dev/null
  timed "consumer ready" wait_until 60 caught_up || die_with_log "$TMP/log/order.log" "the order role never caught up"
  warm=$(users_sql 'SELECT max(id) FROM users')

  log "paced load: $RATE CreateUser/s for $RUN_SECONDS s (8 streams)"
  line=$("$LOAD_BIN" create --addr "http://127.0.0.1:$USER_PORT" --concurrency 8 --seconds "$RUN_SECONDS" --rate "$RATE")
  log "user_load: $line"
  timed "drain" wait_until 120 caught_up || die_with_log "$TMP/log/order.log" "the order role did not catch up"

  printf '\nevent lag, outbox write -> applied by the order role, at %s CreateUser/s:\n' "$RATE"
  orders_sql "
    WITH lag AS (SELECT extract(epoch FROM applied_at - occurred_at) * 1000 AS ms
                   FROM applied_events WHERE user_id > $warm)
    SELECT format('events %s   p50 %s ms   p90 %s ms   p99 %s ms   max %s ms', count(*),
                  round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 1),
                  round(percentile_cont(0.9) WITHIN GROUP (ORDER BY ms)::numeric, 1),
                  round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 1),
                  round(max(ms)::numeric, 1))
      FROM lag"
}

main "$@"

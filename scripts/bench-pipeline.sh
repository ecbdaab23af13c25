#!/usr/bin/env bash
# Measures the event pipeline (user outbox -> relay -> broker -> order replica) against the broker's
# own figures, measured in the same run with records of the same shape (benches/broker_probe.rs, a
# scratch topic). Throwaway stack: both PostgreSQL clusters with the seed's tuning, a nisshi
# broker, `msys user` and `msys order` (release builds), on free ports, torn down afterwards.
# Prints figures and ratios (targets from issue 12); asserts nothing.
#
#   1. catch-up: 10 s of CreateUser at 32 streams, then the time from the end of the load until
#      the replica holds every user (target <= 2 s);
#   2. relay: a backlog written while the relay cannot reach the broker, then drained: its
#      publish rate / the broker's idempotent produce rate (target >= 0.8);
#   3. apply: that backlog applied by a fresh `msys order`: its apply rate / the broker's
#      single-consumer rate (target >= 0.5);
#   4. lag: p99 outbox write -> applied at 200 CreateUser/s / the broker's produce -> consume p99
#      at 200 records/s (target <= 2).
#
# usage: scripts/bench-pipeline.sh
# environment:
#   MSYS_BIN          msys binary to run instead of a cargo release build (e.g. an older build)
#   MSYS_KEEP_TMP=1   keep the temporary directory (data and logs)
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

LOAD_SECONDS=10
LAG_RATE=200
LAG_SECONDS=20
TMP=
LOAD_BIN=
PROBE_BIN=

# shellcheck disable=SC2317  # the EXIT trap
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

orders_sql() {
  PGPASSWORD=postgres "$PG_BINDIR/psql" -h 127.0.0.1 -p "$ORDERS_PG" -U postgres -d orders_db -XAtq -F ' ' -c "$1"
}

users_sql() {
  PGPASSWORD=postgres "$PG_BINDIR/psql" -h 127.0.0.1 -p "$USERS_PG" -U postgres -d users_db -XAtq -F ' ' -c "$1"
}

# True once the order side has applied as many events as the user side wrote.
caught_up() {
  local written applied
  written=$(users_sql 'SELECT count(*) FROM user_outbox' 2>/dev/null) || return 1
  applied=$(orders_sql 'SELECT count(*) FROM applied_events' 2>/dev/null) || return 1
  [[ -n $written && $written -gt 0 && $written == "$applied" ]]
}

# True once the replica holds every user: the check the issue's user makes.
replica_complete() {
  local users known
  users=$(users_sql 'SELECT count(*), coalesce(max(id), 0) FROM users' 2>/dev/null) || return 1
  known=$(orders_sql 'SELECT count(*), coalesce(max(user_id), 0) FROM known_users' 2>/dev/null) || return 1
  [[ -n $users && $users == "$known" ]]
}

outbox_drained() {
  [[ $(users_sql 'SELECT count(*) FROM user_outbox WHERE published_at IS NULL' 2>/dev/null) == 0 ]]
}

# Starts one role, healthy before returning; KAFKA_PORT may be overridden (a dead port).
start_role() {
  local role=$1 port=$2 kafka=${3:-$KAFKA_PORT} pidfile=$TMP/run/$1.pid logf=$TMP/log/$1.log
  start_daemon "$pidfile" "$logf" "$TMP/run" env USER_POSTGRES_PORT="$USERS_PG" USER_POSTGRES_DB=users_db \
    ORDER_POSTGRES_PORT="$ORDERS_PG" ORDER_POSTGRES_DB=orders_db KAFKA_HOST=127.0.0.1 KAFKA_PORT="$kafka" \
    MSYS_LISTEN_HOST=127.0.0.1 "$MSYS_BIN" "$role" --port "$port"
  # shellcheck disable=SC2317  # called through wait_until
  healthy() { "$MSYS_BIN" health "127.0.0.1:$1" >/dev/null 2>&1; }
  wait_until 60 daemon_check "$pidfile" "msys $role" "$logf" healthy "$port" ||
    die_with_log "$logf" "msys $role not healthy on 127.0.0.1:$port after 60s"
}

build_probe() {
  local json
  log "cargo bench --bench broker_probe --no-run"
  json=$(cd "$MSYS_ROOT" && cargo bench --bench broker_probe --no-run --message-format=json-render-diagnostics) ||
    die "building benches/broker_probe.rs failed (compiler output above)"
  PROBE_BIN=$(sed -n 's/.*"executable":"\([^"]*broker_probe[^"]*\)".*/\1/p' <<<"$json" | tail -n 1)
  [[ -x $PROBE_BIN ]] || die "cargo bench --no-run did not report the broker_probe executable"
}

# The value of KEY=VALUE in a line of figures.
field() { sed -n "s/.*\\b$1=\\([^ ]*\\).*/\\1/p" <<<"$2"; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

main() {
  local probe broker_produce broker_consume lag_probe broker_p99 load end_ms caught_ms first_b dead
  local relay apply lag ours_p99 catchup users_b unpublished drained_ms
  trap teardown EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  timed "packages" ensure_packages initdb:postgresql
  timed "nisshi" ensure_nisshi
  find_pg_bindir || die "PostgreSQL binaries not found after installing postgresql"
  timed "build" build_msys_and_load
  timed "build probe" build_probe

  make_throwaway_dir TMP msys-pipeline
  free_port USERS_PG
  timed "postgres users" pg_start_cluster "$TMP/pg/users" "$USERS_PG" \
    "$MSYS_ROOT/config/postgres/users.conf" "$TMP/log/postgres-users.log"
  free_port ORDERS_PG
  timed "postgres orders" pg_start_cluster "$TMP/pg/orders" "$ORDERS_PG" \
    "$MSYS_ROOT/config/postgres/orders.conf" "$TMP/log/postgres-orders.log"
  free_port KAFKA_PORT
  timed "broker" start_nisshi "$TMP/kafka" "$KAFKA_PORT" "$TMP/log/kafka.log" "$TMP/run/kafka.pid"
  create_user_events_topic "$KAFKA_PORT" "$TMP/log/kafka.log"

  # The broker's own figures first, while nothing else runs.
  probe=$("$PROBE_BIN" throughput --brokers "127.0.0.1:$KAFKA_PORT" --records 50000)
  log "broker throughput: $probe"
  broker_produce=$(field produce_rps "$probe")
  broker_consume=$(field consume_rps "$probe")
  lag_probe=$("$PROBE_BIN" latency --brokers "127.0.0.1:$KAFKA_PORT" --rate "$LAG_RATE" --seconds "$LAG_SECONDS")
  log "broker latency: $lag_probe"
  broker_p99=$(field p99_ms "$lag_probe")

  free_port USER_PORT
  free_port ORDER_PORT
  timed "msys user" start_role user "$USER_PORT"
  timed "msys order" start_role order "$ORDER_PORT"
  "$LOAD_BIN" create --addr "http://127.0.0.1:$USER_PORT" --concurrency 1 --seconds 2 --rate 5 >/dev/null
  timed "consumer ready" wait_until 60 caught_up || die_with_log "$TMP/log/order.log" "the order role never caught up"

  # 1. Catch-up after a burst.
  log "burst: CreateUser at 32 streams for $LOAD_SECONDS s"
  load=$("$LOAD_BIN" create --addr "http://127.0.0.1:$USER_PORT" --concurrency 32 --seconds "$LOAD_SECONDS")
  end_ms=$(now_ms)
  # Where the time after the burst goes: the events not yet at the broker when it ended, and when
  # the relay had them all there (the outbox drained), before the replica finishes applying.
  unpublished=$(users_sql 'SELECT count(*) FROM user_outbox WHERE published_at IS NULL')
  log "user_load: $load"
  wait_until 300 outbox_drained || die_with_log "$TMP/log/user.log" "the outbox did not drain in 300 s"
  drained_ms=$(($(now_ms) - end_ms))
  wait_until 300 replica_complete || die_with_log "$TMP/log/order.log" "the replica did not catch up in 300 s"
  caught_ms=$(($(now_ms) - end_ms))
  log "replica complete ${caught_ms} ms after the burst ended ($unpublished events unpublished then, all published after ${drained_ms} ms)"
  wait_until 120 caught_up || die_with_log "$TMP/log/order.log" "the order role did not apply every event"

  # 2. and 3. A backlog the relay cannot publish yet (the user role points at a closed port),
  # then published by a restarted user role, then applied by a restarted order role.
  stop_daemon "msys order" "$TMP/run/order.pid" "msys order" 20
  stop_daemon "msys user" "$TMP/run/user.pid" "msys user" 20
  first_b=$(users_sql 'SELECT coalesce(max(id), 0) FROM user_outbox')
  users_b=$(users_sql 'SELECT coalesce(max(id), 0) FROM users')
  free_port dead
  start_role user "$USER_PORT" "$dead"
  log "backlog: CreateUser at 32 streams for $LOAD_SECONDS s, broker unreachable"
  log "user_load: $("$LOAD_BIN" create --addr "http://127.0.0.1:$USER_PORT" --concurrency 32 --seconds "$LOAD_SECONDS")"
  stop_daemon "msys user" "$TMP/run/user.pid" "msys user" 20
  start_role user "$USER_PORT"
  timed "relay drain" wait_until 300 outbox_drained || die_with_log "$TMP/log/user.log" "the outbox never drained"
  # Each chunk's rows share the instant its acks came back (statement_timestamp()): the rate is
  # the rows stamped after the first chunk over the time from that chunk's stamp to the last one.
  relay=$(users_sql "WITH b AS (SELECT published_at FROM user_outbox WHERE id > $first_b),
                          f AS (SELECT min(published_at) AS t0 FROM b)
                     SELECT count(*) FILTER (WHERE published_at > t0), extract(epoch FROM max(published_at) - min(t0))
                       FROM b, f")
  log "relay: events stamped after the first chunk, seconds from its stamp to the last: $relay"
  start_role order "$ORDER_PORT"
  timed "apply backlog" wait_until 300 caught_up || die_with_log "$TMP/log/order.log" "the backlog was not applied"
  apply=$(orders_sql "SELECT count(*), extract(epoch FROM max(applied_at) - min(applied_at))
                        FROM applied_events WHERE user_id > $users_b")
  log "apply: events, seconds from first to last apply: $apply"

  # 4. Lag at a steady rate.
  local warm
  warm=$(users_sql 'SELECT coalesce(max(id), 0) FROM users')
  log "paced: $LAG_RATE CreateUser/s for $LAG_SECONDS s"
  "$LOAD_BIN" create --addr "http://127.0.0.1:$USER_PORT" --concurrency 8 --seconds "$LAG_SECONDS" \
    --rate "$LAG_RATE" >/dev/null
  wait_until 120 caught_up || die_with_log "$TMP/log/order.log" "the order role did not catch up"
  lag=$(orders_sql "
    WITH lag AS (SELECT extract(epoch FROM applied_at - occurred_at) * 1000 AS ms
                   FROM applied_events WHERE user_id > $warm)
    SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 1),
           round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 1) FROM lag")
  ours_p99=$(awk '{print $2}' <<<"$lag")
  log "lag p50 p99 (ms): $lag"

  local relay_n relay_s relay_rps apply_n apply_s apply_rps
  read -r relay_n relay_s <<<"$relay"
  read -r apply_n apply_s <<<"$apply"
  relay_rps=$(awk -v n="$relay_n" -v s="$relay_s" 'BEGIN { printf "%.0f", (s > 0 ? n / s : 0) }')
  apply_rps=$(awk -v n="$apply_n" -v s="$apply_s" 'BEGIN { printf "%.0f", (s > 0 ? n / s : 0) }')
  catchup=$(awk -v ms="$caught_ms" 'BEGIN { printf "%.1f", ms / 1000 }')

  printf '\nbroker (nisshi, same run, %s B records): produce %s/s (idempotent, %s headers a record; %s/s without them), consume %s/s (one consumer),' \
    "$(field record_bytes "$probe")" "$broker_produce" "$(field headers "$probe")" \
    "$(field produce_without_headers_rps "$probe")" "$broker_consume"
  printf ' produce->consume p50 %s ms p99 %s ms at %s/s\n' "$(field p50_ms "$lag_probe")" "$broker_p99" "$LAG_RATE"
  printf 'burst: %s\n' "$load"
  printf '%-58s %10s   %s\n' "figure" "value" "ratio (target)"
  printf '%-58s %9ss   %s\n' "1. replica complete after the burst ended" "$catchup" "(target <= 2 s)"
  printf '%-58s %9ss   %s\n' "   of which: the relay publishing the $unpublished events left" \
    "$(awk -v ms="$drained_ms" 'BEGIN { printf "%.1f", ms / 1000 }')" "(at the broker's rate: $(
      awk -v n="$unpublished" -v r="$broker_produce" 'BEGIN { printf "%.1f s", (r > 0 ? n / r : 0) }'))"
  printf '%-58s %8s/s   %s (>= 0.8)\n' "2. relay publish rate ($relay_n events)" "$relay_rps" \
    "$(ratio "$relay_rps" "$broker_produce") of the broker's produce rate"
  printf '%-58s %8s/s   %s (>= 0.5)\n' "3. replica apply rate ($apply_n events)" "$apply_rps" \
    "$(ratio "$apply_rps" "$broker_consume") of the broker's consume rate"
  printf '%-58s %7s ms   %s (<= 2)\n' "4. p99 write->applied at $LAG_RATE/s (p50 $(awk '{print $1}' <<<"$lag") ms)" \
    "$ours_p99" "$(ratio "$ours_p99" "$broker_p99") x the broker's p99"
}

main "$@"

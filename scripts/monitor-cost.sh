#!/usr/bin/env bash
# Measures what the monitor costs at its default interval (1 s), on throwaway PostgreSQL clusters
# and a nisshi broker with the user and order roles running idle:
#   - the monitor's own CPU (its /proc/PID/stat utime+stime) and RSS (VmRSS);
#   - the time to take one snapshot (the snapshots' collect_ms, sampled every 5 s, and the max);
#   - the extra load on PostgreSQL: the monitor's statements in pg_stat_statements (they all start
#     with /* msys-monitor */) and the CPU of the backends serving it; and the CPU of all
#     PostgreSQL processes with the monitor against a stretch without it (the reference);
#   - the extra load on the broker: nisshi's CPU with the monitor against the same stretch without.
# Prints the figures and the ratios against the reference measured in the same run.
#
# usage: scripts/monitor-cost.sh [SECONDS]   (default 60 per stretch)
# environment: MSYS_BIN (default: a release build, built if needed), MSYS_KEEP_TMP=1
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SECONDS_PER_STRETCH=${1:-60}
TMP=
PIDS=()

# shellcheck disable=SC2317  # the EXIT trap
teardown() {
  local pid
  trap - EXIT INT TERM
  set +e
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  if [[ -n $TMP ]]; then
    stop_daemon broker "$TMP/run/kafka.pid" nisshi 10
    pg_stop_cluster "$TMP/pg/users" immediate
    pg_stop_cluster "$TMP/pg/orders" immediate
    [[ ${MSYS_KEEP_TMP:-} == 1 ]] || rm -rf "$TMP"
  fi
}

# utime + stime of PID, in clock ticks (USER_HZ, 100 per second).
ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }

# Ticks of every process of a PostgreSQL cluster (the postmaster and its children).
pg_ticks() {
  local postmaster total=0 pid
  postmaster=$(head -n 1 "$1/postmaster.pid")
  for pid in $postmaster $(ps -o pid= --ppid "$postmaster"); do total=$((total + $(ticks "$pid"))); done
  echo "$total"
}

psql_at() { PGPASSWORD=postgres "$PG_BINDIR/psql" -h 127.0.0.1 -p "$1" -U postgres -d "$2" -Atqc "$3"; }

# Calls and execution ms of the monitor's statements on both clusters (all databases).
monitor_statements() {
  local sql="SELECT coalesce(sum(calls),0) || ' ' || coalesce(sum(total_exec_time),0) FROM pg_stat_statements
    WHERE query LIKE '/* msys-monitor */%'"
  # The monitor creates the extension in the databases it watches.
  { psql_at "$USER_PG" users_db "$sql"; psql_at "$ORDER_PG" orders_db "$sql"; } |
    awk '{ calls += $1; ms += $2 } END { printf "%d %.3f\n", calls, ms }'
}

# Ticks of the backends serving the monitor, on both clusters.
monitor_backend_ticks() {
  local port pid total=0
  for port in "$USER_PG" "$ORDER_PG"; do
    for pid in $(psql_at "$port" postgres "SELECT pid FROM pg_stat_activity WHERE application_name = 'msys-monitor'"); do
      total=$((total + $(ticks "$pid")))
    done
  done
  echo "$total"
}

# One stretch: CPU ticks of the broker and of both clusters over SECONDS_PER_STRETCH.
stretch() {
  local broker_pid b0 u0 o0
  broker_pid=$(<"$TMP/run/kafka.pid")
  b0=$(ticks "$broker_pid") u0=$(pg_ticks "$TMP/pg/users") o0=$(pg_ticks "$TMP/pg/orders")
  sleep "$SECONDS_PER_STRETCH"
  echo "$(($(ticks "$broker_pid") - b0)) $(($(pg_ticks "$TMP/pg/users") - u0 + $(pg_ticks "$TMP/pg/orders") - o0))"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
pct() { awk -v t="$1" -v s="$SECONDS_PER_STRETCH" 'BEGIN { printf "%.2f%%", t / s }'; }

main() {
  trap teardown EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  ensure_nisshi
  ensure_msys build
  find_pg_bindir || die "PostgreSQL binaries not found"
  make_throwaway_dir TMP msys-monitor-cost
  mkdir -p "$TMP/log" "$TMP/run"
  free_port USER_PG
  pg_start_cluster "$TMP/pg/users" "$USER_PG" "$MSYS_ROOT/config/postgres/test.conf" "$TMP/log/pg-users.log"
  free_port ORDER_PG
  pg_start_cluster "$TMP/pg/orders" "$ORDER_PG" "$MSYS_ROOT/config/postgres/test.conf" "$TMP/log/pg-orders.log"
  free_port KAFKA
  start_nisshi "$TMP/kafka" "$KAFKA" "$TMP/log/kafka.log" "$TMP/run/kafka.pid"
  create_user_events_topic "$KAFKA" "$TMP/log/kafka.log"

  local user_port order_port monitor_port p
  free_port user_port
  free_port order_port
  free_port monitor_port
  export USER_POSTGRES_PORT=$USER_PG ORDER_POSTGRES_PORT=$ORDER_PG KAFKA_HOST=127.0.0.1 KAFKA_PORT=$KAFKA
  export USER_POSTGRES_PASSWORD=postgres ORDER_POSTGRES_PASSWORD=postgres MSYS_LISTEN_HOST=127.0.0.1
  export USER_METRICS_PORT=0 ORDER_METRICS_PORT=0 MONITOR_METRICS_PORT=0
  "$MSYS_BIN" user --port "$user_port" >"$TMP/log/user.log" 2>&1 &
  PIDS+=($!)
  wait_until 60 "$MSYS_BIN" health "127.0.0.1:$user_port" --service msys.v1.UserService || die_with_log "$TMP/log/user.log" "user role not ready"
  "$MSYS_BIN" order --port "$order_port" >"$TMP/log/order.log" 2>&1 &
  PIDS+=($!)
  wait_until 60 "$MSYS_BIN" health "127.0.0.1:$order_port" --service msys.v1.OrderService || die_with_log "$TMP/log/order.log" "order role not ready"

  log "reference stretch: user and order idle, no monitor (${SECONDS_PER_STRETCH}s)"
  read -r broker_ref pg_ref < <(stretch)

  MONITOR_USER_ADDR=http://127.0.0.1:$user_port MONITOR_ORDER_ADDR=http://127.0.0.1:$order_port \
    "$MSYS_BIN" monitor --port "$monitor_port" >"$TMP/log/monitor.log" 2>&1 &
  local monitor_pid=$!
  PIDS+=("$monitor_pid")
  wait_until 60 "$MSYS_BIN" health "127.0.0.1:$monitor_port" --service msys.v1.MonitorService || die_with_log "$TMP/log/monitor.log" "monitor not ready"
  sleep 5
  log "measured stretch: the same with the monitor at its default interval (${SECONDS_PER_STRETCH}s)"
  local m0 s0 k0 samples
  m0=$(ticks "$monitor_pid") s0=$(monitor_statements) k0=$(monitor_backend_ticks)
  # Snapshot times, one every 5 s, in the background of the stretch.
  ( for ((p = 0; p < SECONDS_PER_STRETCH / 5; p++)); do
      sleep 5
      "$MSYS_BIN" status --monitor "http://127.0.0.1:$monitor_port" --json | jq -r '.monitor.collectMs'
    done >"$TMP/collect_ms" ) &
  samples=$!
  read -r broker_mon pg_mon < <(stretch)
  wait "$samples"
  local m1 s1 k1 rss json
  m1=$(ticks "$monitor_pid") s1=$(monitor_statements) k1=$(monitor_backend_ticks)
  rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$monitor_pid/status")
  json=$("$MSYS_BIN" status --monitor "http://127.0.0.1:$monitor_port" --json)

  local calls ms
  read -r calls ms < <(awk -v a="$s0" -v b="$s1" 'BEGIN { split(a, x, " "); split(b, y, " "); print y[1] - x[1], y[2] - x[2] }')
  echo
  echo "monitor cost at the default 1 s interval, ${SECONDS_PER_STRETCH} s stretches (user and order roles idle)"
  echo "  monitor CPU                 $(pct $((m1 - m0))) of one core ($((m1 - m0)) ticks)"
  echo "  monitor RSS                 $((rss / 1024)) MiB"
  echo "  snapshot time (collect_ms)  mean $(awk '{ s += $1; n++ } END { printf "%.1f", s / n }' "$TMP/collect_ms") ms," \
    "max $(jq -r '.monitor.maxCollectMs | . * 10 | round / 10' <<<"$json") ms over $(jq -r '.monitor.snapshotsTaken' <<<"$json") snapshots," \
    "ticks skipped $(jq -r '.monitor.ticksSkipped' <<<"$json")"
  echo "  PostgreSQL, its statements  $(awk -v c="$calls" -v s="$SECONDS_PER_STRETCH" 'BEGIN { printf "%.1f", c / s }') calls/s," \
    "$(awk -v m="$ms" -v s="$SECONDS_PER_STRETCH" 'BEGIN { printf "%.2f", m / s }') ms of execution per second (both servers)"
  echo "  PostgreSQL, its backends    $(pct $((k1 - k0))) of one core"
  echo "  PostgreSQL, all processes   $(pct "$pg_mon") with the monitor vs $(pct "$pg_ref") without: ratio $(ratio "$pg_mon" "$pg_ref")"
  echo "  broker (nisshi) CPU         $(pct "$broker_mon") with the monitor vs $(pct "$broker_ref") without: ratio $(ratio "$broker_mon" "$broker_ref")"
  echo
  "$MSYS_BIN" status --monitor "http://127.0.0.1:$monitor_port"
}

main "$@"

#!/usr/bin/env bash
# The user role's memory after its PostgreSQL restarts under load (issue 17 point 8), on a
# throwaway stack: PostgreSQL with the seed's users tuning, a nisshi broker and `msys user`
# (release build), each on a free port in a temporary directory, torn down afterwards.
#
# 1. idle RSS after start, then after a warm-up load with no fault ("before");
# 2. the same load again (msys load: CreateUser and GetUser, closed loop), during which the users
#    PostgreSQL is restarted MSYS_MEM_RESTARTS times with `pg_ctl restart -m fast`;
# 3. idle RSS after the faults, at once and after MSYS_MEM_SETTLE seconds ("after").
# Prints each figure with its ratio to "before" (the reference, measured in the same run) and
# the P4 target (idle <= 25 MB). Asserts nothing: it exits non-zero only if the setup fails.
#
# usage: scripts/bench-memory-faults.sh
# environment:
#   MSYS_BIN              msys binary to run instead of a cargo release build
#   MSYS_MEM_RESTARTS     restarts of PostgreSQL under load (default 3; 0 is the control run: the
#                         same load with no fault)
#   MSYS_MEM_LOAD         seconds of load in step 2 (default 40)
#   MSYS_MEM_CONCURRENCY  callers of each of CreateUser and GetUser (default 32)
#   MSYS_MEM_SETTLE       seconds of idle before the last reading (default 30)
#   MSYS_MEM_BACKTRACE    RUST_BACKTRACE for the role (default 1, as operators often set it and
#                         as on the machine where the issue was measured)
#   MSYS_KEEP_TMP=1       keep the temporary directory (data and logs)
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RESTARTS=${MSYS_MEM_RESTARTS:-3}
LOAD_SECONDS=${MSYS_MEM_LOAD:-40}
CONCURRENCY=${MSYS_MEM_CONCURRENCY:-32}
SETTLE=${MSYS_MEM_SETTLE:-30}
BACKTRACE=${MSYS_MEM_BACKTRACE:-1}
TMP=
ROLE_PID=
LOAD_PIDS=()

# shellcheck disable=SC2317  # the EXIT trap
# Best effort: stops everything this run started, whatever state the run died in.
teardown() {
  local status=$? pid
  trap - EXIT INT TERM
  set +e
  for pid in "${LOAD_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  stop_user_stack
  exit "$status"
}

# The role's resident memory in kB (VmRSS), or its peak (VmHWM).
rss_kb() { awk -v key="${1:-VmRSS}:" '$1 == key { print $2 }' "/proc/$ROLE_PID/status"; }

# Threads, and resident memory split into anonymous (heap, stacks) and file-backed (the binary).
detail() {
  local threads anon file
  threads=$(awk '$1 == "Threads:" { print $2 }' "/proc/$ROLE_PID/status")
  anon=$(awk '$1 == "RssAnon:" { print $2 }' "/proc/$ROLE_PID/status")
  file=$(awk '$1 == "RssFile:" { print $2 }' "/proc/$ROLE_PID/status")
  echo "threads $threads, anonymous $(mb "$anon") MB, file $(mb "$file") MB"
}

mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# Starts CreateUser and GetUser load for SECONDS in the background (pids in LOAD_PIDS).
start_load() {
  local seconds=$1 scenario
  LOAD_PIDS=()
  for scenario in users reads; do
    "$MSYS_BIN" load --scenario "$scenario" --concurrency "$CONCURRENCY" --duration "${seconds}s" \
      --user-addr "http://127.0.0.1:$USER_PORT" --no-progress >>"$TMP/log/load-$scenario.log" 2>&1 &
    LOAD_PIDS+=($!)
  done
}

# Waits for the load; a load that failed (not merely counted errors) is reported, not fatal.
wait_load() {
  local pid
  local scenario
  for pid in "${LOAD_PIDS[@]}"; do wait "$pid" || warn "msys load (pid $pid) exited with $?; see $TMP/log"; done
  LOAD_PIDS=()
  for scenario in users reads; do
    log "msys load --scenario $scenario said:"
    tail -n 12 "$TMP/log/load-$scenario.log" >&2
  done
}

restart_postgres() {
  log "pg_ctl restart -m fast"
  run_as_pg "$PG_BINDIR/pg_ctl" restart -D "$TMP/pg/users" -m fast -w -t 60 -s >>"$TMP/log/postgres-users.log" 2>&1 ||
    die_with_log "$TMP/log/postgres-users.log" "pg_ctl restart failed"
}

main() {
  local started warm before peak_before after settled peak i
  trap teardown EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  ensure_packages initdb:postgresql
  ensure_nisshi
  find_pg_bindir || die "PostgreSQL binaries not found after installing postgresql"
  ensure_msys build

  start_user_stack msys-memory
  start_user_role RUST_BACKTRACE="$BACKTRACE"
  sleep 3
  started=$(rss_kb)
  log "after start: $(detail)"

  log "warm-up: 15 s of load, no fault"
  start_load 15
  wait_load
  sleep 5
  before=$(rss_kb)
  log "before the faults: $(detail)"
  peak_before=$(rss_kb VmHWM)

  log "the same load for $LOAD_SECONDS s, restarting PostgreSQL $RESTARTS times"
  start_load "$LOAD_SECONDS"

  for ((i = 1; i <= RESTARTS; i++)); do
    sleep 8
    restart_postgres
  done
  wait_load
  wait_until 60 user_role_healthy || die_with_log "$TMP/log/user.log" "msys user not healthy after the restarts"
  sleep 5
  after=$(rss_kb)
  log "after the faults: $(detail)"
  sleep "$SETTLE"
  settled=$(rss_kb)
  log "${SETTLE} s later: $(detail)"
  peak=$(rss_kb VmHWM)

  log "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs; load logs in $TMP/log"
  printf '\n%-44s %10s %12s\n' "user role RSS (release, RUST_BACKTRACE=$BACKTRACE)" "MB" "/ before"
  printf '%-44s %10s %12s\n' "idle after start" "$(mb "$started")" "$(awk -v a="$started" -v b="$before" 'BEGIN { printf "%.2f", a / b }')"
  printf '%-44s %10s %12s\n' "idle after a load without faults (before)" "$(mb "$before")" "1.00"
  printf '%-44s %10s %12s\n' "peak during that load" "$(mb "$peak_before")" ""
  printf '%-44s %10s %12s\n' "idle after $RESTARTS restarts under load" "$(mb "$after")" "$(awk -v a="$after" -v b="$before" 'BEGIN { printf "%.2f", a / b }')"
  printf '%-44s %10s %12s\n' "idle ${SETTLE} s later" "$(mb "$settled")" "$(awk -v a="$settled" -v b="$before" 'BEGIN { printf "%.2f", a / b }')"
  printf '%-44s %10s %12s\n' "peak over the whole run" "$(mb "$peak")" ""
  printf '%-44s %10s\n' "target (P4): idle" "<= 25"
}

main "$@"

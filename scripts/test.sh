#!/usr/bin/env bash
# Runs `cargo test` against throwaway infrastructure: two PostgreSQL clusters (users, orders; with
# config/postgres/test.conf) and a nisshi broker, each on a free port in a fresh temporary
# directory, torn down afterwards even on failure or Ctrl-C. Installs what is missing first
# (postgresql with apt-get when root; nisshi into ~/.cache/msys, once). Exits with cargo's status.
# msys roles are not started here: the tests start their own.
# Then the browser tests (tests/e2e, node's test runner driving Debian's chromium through
# playwright-core) run against the whole system started from the msys binary cargo test built;
# chromium and the npm packages are installed when missing, the dashboard bundle is built first.
#
# usage: scripts/test.sh [cargo test arguments...]
# environment:
#   MSYS_KEEP_TMP=1   keep the temporary directory (data and logs) for inspection
#   MSYS_E2E=auto|1|0|only   browser tests: auto (default) runs them only when no cargo test
#                     arguments were given; 1 always; 0 never; only skips cargo test
#   MSYS_BIN          the msys binary the browser tests run (default: the debug build)
#
# The tests get: MSYS_TEST_PG_HOST, MSYS_TEST_USER_PG_PORT, MSYS_TEST_ORDER_PG_PORT,
# MSYS_TEST_PG_USER, MSYS_TEST_PG_PASSWORD, MSYS_TEST_KAFKA (host:port), MSYS_PG_BINDIR,
# MSYS_NISSHI_BIN, MSYS_TEST_SCRATCH (mode 1777, for clusters and brokers of their own) and
# MSYS_TEST_PG_RUN_AS (postgres when running as root: PostgreSQL must then run as that user).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TMP=
SCRATCH=

# shellcheck disable=SC2317  # only reached from the EXIT trap, which shellcheck does not follow
# Clusters and brokers that tests started under the scratch directory and left behind (a
# crashed or killed test) must not outlive the run either.
sweep_scratch() {
  local pidfile link pid
  [[ -n $SCRATCH && -d $SCRATCH ]] || return 0
  while IFS= read -r -d '' pidfile; do
    if run_as_pg "$PG_BINDIR/pg_ctl" stop -D "${pidfile%/postmaster.pid}" -m immediate -w -t 10 -s >/dev/null 2>&1; then
      warn "stopped PostgreSQL left running by a test in ${pidfile%/postmaster.pid}"
    fi
  done < <(find "$SCRATCH" -name postmaster.pid -print0 2>/dev/null)
  for link in /proc/[0-9]*/cwd; do
    [[ $(readlink "$link" 2>/dev/null) == "$SCRATCH"/* ]] || continue
    pid=${link#/proc/}
    pid=${pid%/cwd}
    [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
    warn "killing process $pid left running by a test in $SCRATCH: $(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")"
    kill -KILL "$pid" 2>/dev/null || true
  done
}

# shellcheck disable=SC2317  # the EXIT trap
# Best effort and never fatal: a teardown error must not mask cargo's exit status.
teardown() {
  local status=$? start
  trap - EXIT INT TERM
  set +e
  start=$(now_ms)
  if [[ -n $TMP ]]; then
    log "tearing down $TMP"
    # Subshells: a step that dies must not skip the ones after it.
    (sweep_scratch)
    (stop_daemon broker "$TMP/run/kafka.pid" nisshi 10)
    (pg_stop_cluster "$TMP/pg/users" immediate)
    (pg_stop_cluster "$TMP/pg/orders" immediate)
    if [[ ${MSYS_KEEP_TMP:-} == 1 ]]; then
      log "kept $TMP (MSYS_KEEP_TMP=1)"
    else
      rm -rf "$TMP"
    fi
  fi
  MSYS_TIMINGS+=("teardown|$(($(now_ms) - start))")
  print_timings
  exit "$status"
}

# The temporary tree, with a scratch directory any user can write (tests run clusters there as
# the postgres user when we are root).
make_tmp() {
  make_throwaway_dir TMP msys-test
  SCRATCH=$TMP/scratch
  mkdir -p "$SCRATCH"
  chmod 1777 "$SCRATCH"
}

# The production topic layout (3 partitions) on the shared broker, before any test can
# auto-create the topic with the broker's default of 4.
create_events_topic() {
  "$NISSHI_BIN" topic create user-events --partitions 3 --broker "tcp://127.0.0.1:$1" >/dev/null 2>&1 ||
    die_with_log "$TMP/log/kafka.log" "creating topic user-events on the test broker failed"
}

# On a cold run (CI's first, a fresh clone) nisshi is missing: compile the tests meanwhile, so the
# two builds fill each other's serial stretches instead of running one after the other.
PREBUILD_PID=
prebuild_tests_alongside_nisshi() {
  [[ -x $NISSHI_BIN || -n ${MSYS_NISSHI_BIN:-} ]] && return 0
  mkdir -p "$MSYS_CACHE"
  log "cold run: compiling the tests (cargo test --no-run) alongside nisshi; log: $MSYS_CACHE/test-build.log"
  (cd "$MSYS_ROOT" && cargo test --no-run >"$MSYS_CACHE/test-build.log" 2>&1) &
  PREBUILD_PID=$!
}

# A failed prebuild is not fatal: cargo test compiles again and shows the errors itself.
wait_for_prebuild() {
  [[ -n $PREBUILD_PID ]] || return 0
  if wait "$PREBUILD_PID"; then log "tests compiled"; else warn "cargo test --no-run failed; cargo test will show why"; fi
}

# Runs the suite without letting its failure skip the teardown; returns cargo's status.
run_cargo_test() {
  local start status=0
  start=$(now_ms)
  log "cargo test $*"
  (cd "$MSYS_ROOT" && cargo test "$@") || status=$?
  MSYS_TIMINGS+=("cargo test|$(($(now_ms) - start))")
  return "$status"
}

# Whether to run the browser tests after cargo test (see MSYS_E2E above).
want_e2e() {
  case ${MSYS_E2E:-auto} in
    1 | only) return 0 ;;
    0) return 1 ;;
    auto) (($# == 0)) ;;
    *) die "MSYS_E2E=${MSYS_E2E} is not one of auto, 1, 0, only" ;;
  esac
}

# The dashboard in headless chromium against the whole system (tests/e2e/stack.mjs starts the
# roles from the binary cargo built); screenshots and role logs go to tests/e2e/artifacts/.
run_e2e() {
  local start status=0
  timed "chromium" ensure_packages chromium:chromium
  start=$(now_ms)
  export MSYS_BIN=${MSYS_BIN:-${CARGO_TARGET_DIR:-$MSYS_ROOT/target}/debug/msys}
  [[ -x $MSYS_BIN ]] || die "$MSYS_BIN is missing: cargo test should have built it"
  log "browser tests (node --test tests/e2e)"
  (cd "$MSYS_ROOT" && node --test --test-concurrency=1 tests/e2e/) || status=$?
  MSYS_TIMINGS+=("browser tests|$(($(now_ms) - start))")
  if ((status == 0)); then log "browser tests passed"; else log "browser tests failed (exit $status); see tests/e2e/artifacts"; fi
  return "$status"
}

main() {
  local user_pg_port order_pg_port kafka_port status=0
  trap teardown EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  timed "packages" ensure_packages initdb:postgresql promtool:prometheus
  timed "frontend bundle" "$MSYS_ROOT/scripts/build-frontend.sh"
  prebuild_tests_alongside_nisshi
  timed "nisshi" ensure_nisshi
  wait_for_prebuild
  timed "deploy tools" ensure_deploy_tools
  find_pg_bindir || die "PostgreSQL binaries not found after installing postgresql"
  make_tmp
  log "infrastructure in $TMP"

  free_port user_pg_port
  timed "postgres users" pg_start_cluster "$TMP/pg/users" "$user_pg_port" \
    "$MSYS_ROOT/config/postgres/test.conf" "$TMP/log/postgres-users.log"
  free_port order_pg_port
  timed "postgres orders" pg_start_cluster "$TMP/pg/orders" "$order_pg_port" \
    "$MSYS_ROOT/config/postgres/test.conf" "$TMP/log/postgres-orders.log"
  free_port kafka_port
  timed "broker" start_nisshi "$TMP/kafka" "$kafka_port" "$TMP/log/kafka.log" "$TMP/run/kafka.pid"
  create_events_topic "$kafka_port"

  export MSYS_TEST_PG_HOST=127.0.0.1 MSYS_TEST_PG_USER=postgres MSYS_TEST_PG_PASSWORD=postgres
  export MSYS_TEST_USER_PG_PORT=$user_pg_port MSYS_TEST_ORDER_PG_PORT=$order_pg_port
  export MSYS_TEST_KAFKA=127.0.0.1:$kafka_port MSYS_TEST_SCRATCH=$SCRATCH
  export MSYS_PG_BINDIR=$PG_BINDIR MSYS_NISSHI_BIN=$NISSHI_BIN
  MSYS_TEST_PG_RUN_AS=
  if is_root; then MSYS_TEST_PG_RUN_AS=postgres; fi
  export MSYS_TEST_PG_RUN_AS
  log "users PostgreSQL 127.0.0.1:$user_pg_port, orders PostgreSQL 127.0.0.1:$order_pg_port, broker $MSYS_TEST_KAFKA"

  if [[ ${MSYS_E2E:-auto} == only ]]; then
    [[ -n ${MSYS_BIN:-} ]] || (cd "$MSYS_ROOT" && cargo build --bin msys) || exit 1
  else
    run_cargo_test "$@" || status=$?
    if ((status == 0)); then log "cargo test passed"; else log "cargo test failed (exit $status)"; fi
  fi
  if ((status == 0)) && want_e2e "$@"; then
    run_e2e || status=$?
  fi
  exit "$status"
}

main "$@"

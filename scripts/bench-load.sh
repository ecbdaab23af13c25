#!/usr/bin/env bash
# How fast can `msys load` drive a gRPC endpoint, compared with h2load (Debian's nghttp2-client)
# driving the same endpoint in the same run? A load tool that cannot outrun the system it tests
# measures itself. Starts a throwaway stack (PostgreSQL, a nisshi broker, `msys user`, release
# build) on free ports, then alternates MSYS_BENCH_ROUNDS rounds of, on grpc.health.v1.Health/Check:
#   h2load    -c C -m M -t T -D S --warm-up-time W       (C connections x M streams)
#   msys load --scenario health --connections C --concurrency C*M --duration S --warmup W
# The same connections, the same streams in flight, the same measured time after the same warm-up,
# and the same number of threads (msys load's runtime gets T workers through TOKIO_WORKER_THREADS),
# so neither tool is handicapped; both settings are printed. It prints each side's median
# requests/s and their ratio (target >= 0.80). Then it runs the capacity search (`msys load
# --scenario reads --find-max --p99-under 20ms`) and prints that report, so the figures that matter
# come from one run on one machine.
# Asserts nothing: it exits non-zero only if the setup or a load tool fails.
#
# usage: scripts/bench-load.sh
# environment:
#   MSYS_BIN                  msys binary to run instead of a cargo release build
#   MSYS_BENCH_ROUNDS         rounds (default 3)
#   MSYS_BENCH_SECONDS        measured seconds of each run, both tools (default 5)
#   MSYS_BENCH_WARMUP         warm-up seconds before each run, both tools (default 1)
#   MSYS_BENCH_CONNECTIONS    HTTP/2 connections, both tools (default 4)
#   MSYS_BENCH_STREAMS        streams in flight per connection, both tools (default 32)
#   MSYS_BENCH_THREADS        client threads, both tools (default 1, h2load's default)
#   MSYS_BENCH_FIND_MAX=0     skip the capacity search and the users report
#   MSYS_BENCH_BEFORE_BIN     an earlier msys binary, measured in the same rounds (before/after of a change)
#   MSYS_KEEP_TMP=1           keep the temporary directory (data, logs and JSON reports)
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${MSYS_BENCH_ROUNDS:-3}
SECONDS_PER_RUN=${MSYS_BENCH_SECONDS:-5}
WARMUP=${MSYS_BENCH_WARMUP:-1}
CONNECTIONS=${MSYS_BENCH_CONNECTIONS:-4}
STREAMS=${MSYS_BENCH_STREAMS:-32}
THREADS=${MSYS_BENCH_THREADS:-1}
IN_FLIGHT=$((CONNECTIONS * STREAMS))
H2_SETTINGS="h2load -c $CONNECTIONS -m $STREAMS -t $THREADS -D $SECONDS_PER_RUN --warm-up-time $WARMUP"
MSYS_SETTINGS="msys load --scenario health --connections $CONNECTIONS --concurrency $IN_FLIGHT --duration ${SECONDS_PER_RUN}s --warmup ${WARMUP}s (TOKIO_WORKER_THREADS=$THREADS)"
TMP=

# shellcheck disable=SC2317  # the EXIT trap
teardown() {
  local status=$?
  trap - EXIT INT TERM
  set +e
  stop_user_stack
  print_timings
  exit "$status"
}

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# One h2load run on the health check; prints requests/s over the measured time, fails unless
# every request got a 2xx. (-D: timed like msys load, not a request count that a fast tool
# finishes in well under a second, start-up included.)
h2load_rps() {
  local out done_
  out=$(h2load -c "$CONNECTIONS" -m "$STREAMS" -t "$THREADS" -D "$1" --warm-up-time "$2" \
    -H 'content-type: application/grpc' -H 'te: trailers' -d "$TMP/bodies/health_check.bin" \
    "http://127.0.0.1:$USER_PORT/grpc.health.v1.Health/Check" 2>&1) || die "h2load failed: $out"
  done_=$(sed -n 's/^requests: .* \([0-9]*\) done, \([0-9]*\) succeeded, 0 failed, 0 errored, 0 timeout$/\1 \2/p' <<<"$out")
  # Every request done succeeded, and no response was other than 2xx. (h2load can count one 2xx
  # more than it counts done, for a response that arrives as the duration ends.)
  [[ -n $done_ && ${done_% *} == "${done_#* }" ]] && grep -q "^status codes: [0-9]* 2xx, 0 3xx, 0 4xx, 0 5xx" <<<"$out" ||
    die "h2load: not every request got a 2xx: $(grep -E '^(requests|status codes):' <<<"$out" | tr '\n' ' ')"
  sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' <<<"$out"
}

# One `msys load` run on the same endpoint; prints requests/s from its JSON report, and fails
# when a call failed (the gate is the tool's own --threshold). $2: the binary (default MSYS_BIN).
msys_rps() {
  local json=$TMP/msys-load-$1.json
  TOKIO_WORKER_THREADS=$THREADS "${2:-$MSYS_BIN}" load --scenario health --concurrency "$IN_FLIGHT" \
    --connections "$CONNECTIONS" --duration "${SECONDS_PER_RUN}s" --warmup "${WARMUP}s" --no-progress \
    --user-addr "http://127.0.0.1:$USER_PORT" --report "$json" \
    --threshold 'errors<=0' >"$TMP/log/msys-load-$1.txt" 2>&1 ||
    die_with_log "$TMP/log/msys-load-$1.txt" "msys load failed"
  sed -n 's/^  "achieved_rps": \([0-9.]*\),$/\1/p' "$json"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

main() {
  local round h2=() ours=() before=() h2_median ours_median r before_median=''
  trap teardown EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  timed "packages" ensure_packages initdb:postgresql h2load:nghttp2-client
  timed "nisshi" ensure_nisshi
  find_pg_bindir || die "PostgreSQL binaries not found after installing postgresql"
  timed "build" ensure_msys build

  start_user_stack msys-bench-load
  timed "msys user" start_user_role
  "$MSYS_ROOT/scripts/bench/grpc-bodies.sh" "$TMP/bodies" 1

  log "load average before the runs: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs"
  log "h2load:    $H2_SETTINGS"
  log "msys load: $MSYS_SETTINGS"
  h2load_rps 1 0 >/dev/null
  for ((round = 1; round <= ROUNDS; round++)); do
    h2+=("$(h2load_rps "$SECONDS_PER_RUN" "$WARMUP")")
    ours+=("$(msys_rps "$round")")
    if [[ -n ${MSYS_BENCH_BEFORE_BIN:-} ]]; then
      before+=("$(msys_rps "before-$round" "$MSYS_BENCH_BEFORE_BIN")")
      log "round $round: h2load ${h2[-1]} req/s, msys load ${ours[-1]} req/s, before ${before[-1]} req/s"
    else
      log "round $round: h2load ${h2[-1]} req/s, msys load ${ours[-1]} req/s"
    fi
  done
  h2_median=$(median "${h2[@]}")
  ours_median=$(median "${ours[@]}")
  r=$(ratio "$ours_median" "$h2_median")
  ((${#before[@]})) && before_median=$(median "${before[@]}")

  if [[ ${MSYS_BENCH_FIND_MAX:-1} != 0 ]]; then
    log "capacity search: reads, p99 under 20ms, trials of 2 s after 1 s warm-up"
    "$MSYS_BIN" load --scenario reads --find-max --p99-under 20ms --rate 500 --duration 2s --warmup 1s \
      --no-progress --user-addr "http://127.0.0.1:$USER_PORT" --report "$TMP/find-max.json" \
      >"$TMP/log/find-max.txt" 2>&1 || die_with_log "$TMP/log/find-max.txt" "msys load --find-max failed"
    cat "$TMP/log/find-max.txt"
    log "users: CreateUser at 1000/s for 5 s after 1 s warm-up, with --report"
    "$MSYS_BIN" load --scenario users --rate 1000 --duration 5s --warmup 1s --no-progress \
      --user-addr "http://127.0.0.1:$USER_PORT" --report "$TMP/users.json" \
      >"$TMP/log/users.txt" 2>&1 || die_with_log "$TMP/log/users.txt" "msys load --scenario users failed"
    cat "$TMP/log/users.txt"
  fi

  printf '\nh2load:    %s\nmsys load: %s\n' "$H2_SETTINGS" "$MSYS_SETTINGS"
  printf '%-52s %12s %10s\n' "figure (grpc.health.v1 Check, median of $ROUNDS)" "value" "target"
  printf '%-52s %12s\n' "h2load req/s" "$h2_median"
  printf '%-52s %12s\n' "msys load req/s" "$ours_median"
  printf '%-52s %12s %10s  %s\n' "msys load / h2load" "$r" ">= 0.80" \
    "$(awk -v v="$r" 'BEGIN { print (v == "n/a") ? "n/a" : (v >= 0.8) ? "ok" : "MISS" }')"
  if [[ -n $before_median ]]; then
    printf '%-52s %12s\n' "msys load req/s, MSYS_BENCH_BEFORE_BIN" "$before_median"
    printf '%-52s %12s\n' "MSYS_BENCH_BEFORE_BIN / h2load" "$(ratio "$before_median" "$h2_median")"
  fi
}

main "$@"

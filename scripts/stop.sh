#!/usr/bin/env bash
# Stops what scripts/start.sh started, dependants first: the msys roles (SIGTERM, bounded wait,
# then SIGKILL), the broker, then PostgreSQL (pg_ctl stop -m fast). Data stays in the state
# directory. Idempotent: pieces that are not running are skipped.
#
# usage: scripts/stop.sh
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

main() {
  local state
  case ${1:-} in
    -h | --help)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
      return 0
      ;;
    '') ;;
    *) die "unknown argument '$1' (try --help)" ;;
  esac
  state=$(msys_state_dir)
  if [[ ! -d $state ]]; then
    log "nothing to stop: no state directory $state"
    return 0
  fi
  RUN=$state/run
  stop_roles
  stop_daemon broker "$RUN/kafka.pid" nisshi "$TIMEOUT"
  pg_stop_cluster "$state/pg/orders" fast
  pg_stop_cluster "$state/pg/users" fast
  log "msys stopped; data kept in $state"
}

main "$@"

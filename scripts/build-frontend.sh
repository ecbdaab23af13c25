#!/usr/bin/env bash
# Builds the dashboard bundle that `msys frontend` embeds: installs the npm packages pinned by
# frontend/package-lock.json (npm ci, only when missing or stale), then bundles our ES modules and
# uPlot with esbuild into frontend/dist/ (git-ignored). Run it before `cargo build` for a binary
# that serves the dashboard; without it the frontend answers with a page saying to run this.
#
# usage: scripts/build-frontend.sh
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

FRONTEND=$MSYS_ROOT/frontend

# npm ci again only when package-lock.json changed since the last install.
ensure_node_modules() {
  local stamp=$FRONTEND/node_modules/.package-lock.json
  if [[ -f $stamp && $stamp -nt $FRONTEND/package-lock.json && -x $FRONTEND/node_modules/.bin/esbuild ]]; then
    return 0
  fi
  log "npm ci in $FRONTEND"
  (cd "$FRONTEND" && npm ci --no-audit --no-fund --loglevel=error) >&2 || die "npm ci failed in $FRONTEND"
}

main() {
  ensure_packages node:nodejs npm:npm
  ensure_node_modules
  # From scratch, so a file dropped from the sources is not embedded from an old build.
  rm -rf "$FRONTEND/dist"
  (cd "$FRONTEND" && npm run --silent build) || die "esbuild failed (output above)"
  log "dashboard bundle: $(du -sh "$FRONTEND/dist" | cut -f1) in $FRONTEND/dist"
}

main "$@"

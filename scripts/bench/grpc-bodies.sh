#!/usr/bin/env bash
# Writes the request bodies h2load sends to msys, as gRPC length-prefixed messages: 1 byte 0 (not
# compressed), the protobuf length as 4 bytes big-endian, then the protobuf bytes.
#   OUTDIR/get_user.bin      msys.v1.GetUserRequest{id = USER_ID}
#   OUTDIR/health_check.bin  grpc.health.v1.HealthCheckRequest{} (empty service: the whole server)
#
# usage: scripts/bench/grpc-bodies.sh OUTDIR USER_ID
set -euo pipefail

# Protobuf base-128 varint of a non-negative integer, as \xHH escapes.
varint() {
  local n=$1 out=
  while ((n >= 128)); do
    out+=$(printf '\\x%02x' $(((n & 127) | 128)))
    n=$((n >> 7))
  done
  printf '%s\\x%02x' "$out" "$n"
}

# Frames a protobuf payload given as \xHH escapes (4 characters per byte) and writes it to FILE.
write_frame() {
  local file=$1 payload=$2 len
  len=$((${#payload} / 4))
  printf '%b' "$(printf '\\x00\\x%02x\\x%02x\\x%02x\\x%02x' \
    $((len >> 24 & 255)) $((len >> 16 & 255)) $((len >> 8 & 255)) $((len & 255)))$payload" >"$file"
}

main() {
  if (($# != 2)) || [[ ! $2 =~ ^[0-9]+$ ]]; then
    echo "usage: $0 OUTDIR USER_ID" >&2
    exit 2
  fi
  mkdir -p "$1"
  # Field 1 (id), wire type 0 (varint): tag byte 0x08.
  write_frame "$1/get_user.bin" "\\x08$(varint "$2")"
  write_frame "$1/health_check.bin" ""
}

main "$@"

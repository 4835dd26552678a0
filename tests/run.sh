#!/usr/bin/env bash
# Run the test suite inside a private network namespace where only loopback exists, so Ray and
# every test server can reach nothing but 127.0.0.1. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MIFA_IN_NETNS:-}" ]; then
  flags=-n
  [ "$(id -u)" = 0 ] || flags=-rn   # unprivileged: map ourselves to root in a user namespace
  exec unshare $flags env MIFA_IN_NETNS=1 bash "$0" "$@"
fi
ip link set lo up
exec python -m pytest -q "$@"

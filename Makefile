# Common tasks. `make help` lists them.
.PHONY: help test lint fmt types demo check-config bench clean

help:  ## list the tasks
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

test:  ## the full suite (what CI runs): installs deps, finds or starts Redis, pytest + ruff + mypy
	bash scripts/test.sh

lint:  ## ruff check and format check
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

fmt:  ## format and autofix
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .

types:  ## mypy --strict
	.venv/bin/mypy

demo:  ## run the daemon with config/demo.toml on the embedded Redis
	.venv/bin/wechat-bridge run --config config/demo.toml

check-config:  ## validate config/bridge.example.toml
	.venv/bin/wechat-bridge check-config --config config/bridge.example.toml

bench:  ## every benchmark (see bench/README section in README.md)
	bash bench/run_all.sh

clean:  ## remove local state (embedded Redis data of the demo) and caches
	rm -rf var .pytest_cache .mypy_cache .ruff_cache .hypothesis

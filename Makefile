# The two commands of the README. Each one sets up .venv first (idempotent, a few minutes on a fresh machine).
PY := .venv/bin/python

.PHONY: setup demo test lint

setup:
	@bash scripts/setup.sh

# The main job on the embedded default: mini suite, tiny models, baseline vs STGC, lmms-eval, tables, reports.
demo: setup
	$(PY) -m stgc.cli demo

# The test suite (GPU tests skip themselves without CUDA).
test: setup
	$(PY) -m pytest -q

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

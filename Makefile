# The two commands of the README. Each one sets up .venv first (idempotent, a few minutes on a fresh machine).
PY := .venv/bin/python

.PHONY: setup demo reference test lint

setup:
	@bash scripts/setup.sh

# The main job on the embedded default: mini suite, tiny models, baseline vs STGC, lmms-eval, tables, reports.
# Writes only ignored paths (data/mini, runs/tiny, results/demo).
demo: setup
	$(PY) -m stgc.cli demo

# Regenerate the committed reference results (results/tiny) on purpose; commit them afterwards.
reference: setup
	$(PY) -m stgc.cli demo --out results/tiny

# The test suite (GPU tests skip themselves without CUDA).
test: setup
	$(PY) -m pytest -q

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

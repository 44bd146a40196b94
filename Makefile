# Shortcuts for the commands in the README (a venv in .venv, as the README's quick start makes).
PY := .venv/bin/python

.PHONY: reproduce test test-timm lint bench bench-gpu bench-reproduce ci

reproduce:  ## the paper's claims on built-in data (README, first command)
	$(PY) -m adampx reproduce

test:  ## the whole test suite
	$(PY) -m pytest

test-timm:  ## the tests against timm, in their own environment (.venv-timm)
	scripts/test_timm.sh

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

bench:  ## step time and memory tables against torch.optim and the reference (docs/performance.md)
	$(PY) benchmarks/step_time.py

bench-gpu:  ## sync-free, CUDA-graph and timing checks on an NVIDIA GPU
	$(PY) benchmarks/gpu_check.py

bench-reproduce:  ## the reproduction's wall time, quiet and busy (docs/results.md)
	$(PY) benchmarks/reproduce_time.py --markdown docs/results.md

ci:  ## exactly what CI runs
	bash .ci/run

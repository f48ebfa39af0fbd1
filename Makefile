# Two commands: `make demo` and `make test` (`make test-fast`: the tier without launches). Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean

# pip byte-compiles on one core; compileall -j 0 does the same on all cores, in half the time.
# Compiled files matter: with PYTHONDONTWRITEBYTECODE set (as on CI machines), every process
# would otherwise recompile torch from source on import, doubling the test suite's time.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --quiet --no-compile -c constraints.txt -e '.[test]'
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true  # a few packages ship deliberately invalid test files
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) launch/prepare_demo.py datasets/digits
	$(PY) launch/train.py --config configs/demo.toml

# The suite's tests are independent (own tmp folders, own rendezvous ports): two workers on two
# cores halve the wall time, since most of a test's time is one single-threaded subprocess
# (OMP_NUM_THREADS=1). --dist loadfile keeps a module on one worker, so its shared runs are made once.
# --no-loadscope-reorder hands modules out in collection order (tests/e2e/ first, then the many
# small tests/unit/ modules) instead of by test count, which put the heaviest one-test e2e modules
# (the kill/resume runs) last, where one worker finished them while the other sat idle.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

# The fast tier: unit and in-process tests, no subprocess launches of training (`-m "not e2e"`).
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not e2e and not slow" tests

clean:
	rm -rf runs/demo datasets/digits

# The GPU claims measured in one command (about 5 minutes on one H100/H200; see benchmarks/gpu_check.py).
# No $(STAMP): a GPU machine's image often has the packages in its python3 and no registry to build
# .venv from, so .venv is used only where it exists. E.g. make gpu-check GPU_CHECK_ARGS="--out /tmp/gpu.md"
.PHONY: gpu-check
gpu-check:
	PYTHONUNBUFFERED=1 $(if $(wildcard $(PY)),$(PY),$(PYTHON)) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

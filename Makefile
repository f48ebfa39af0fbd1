# Two commands: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

# --no-compile: byte-compiling torch's thousands of modules at install costs about a minute;
# Python compiles what it imports on first use anyway.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --quiet --upgrade pip
	$(PY) -m pip install --quiet --quiet --no-compile -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) launch/prepare_demo.py datasets/digits
	$(PY) launch/train.py --config configs/demo.toml

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf runs/demo datasets/digits

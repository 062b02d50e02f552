# `make test` and `make demo` build .venv from constraints.txt when it is missing (or when
# pyproject.toml / constraints.txt changed), install the project editable with every extra, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.zoo-installed
DEMO_OUT ?= demo-output

.PHONY: test test-all demo venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[all,test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

demo: $(STAMP)
	$(VENV)/bin/zoo demo --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) build dist *.egg-info $(DEMO_OUT)

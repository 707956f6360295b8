# The two set-up commands of the README: `make demo` and `make test`. Both build .venv first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv test test-fast demo eval-env serve-env bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[torch,dev,lora]'
	touch $(STAMP)

venv: $(STAMP)

# Everything, slow tests included (CI runs this).
test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

# Skip the slow tests while iterating.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(BIN)/distill demo $(DEMO_ARGS)

# lighteval cannot share .venv (it needs numpy>=2 and another latex2sympy2_extended): own venv.
eval-env: .venv-eval/.installed
.venv-eval/.installed:
	test -x .venv-eval/bin/python || $(PY) -m venv .venv-eval
	.venv-eval/bin/pip install -q --upgrade pip
	.venv-eval/bin/pip install -q 'lighteval[math]==0.13.0' torch==2.13.0
	touch $@

# `transformers serve`, a real third-party OpenAI-compatible server for tests/test_third_party_server.py.
# transformers 5.x cannot share .venv (MindFormers pins 4.57.1): own venv. Measured: 1m38s-3m40s here.
serve-env: .venv-serve/.installed
.venv-serve/.installed: requirements-serve.txt
	test -x .venv-serve/bin/python || $(PY) -m venv .venv-serve
	.venv-serve/bin/pip install -q --upgrade pip
	.venv-serve/bin/pip install -q -c requirements-serve.txt 'transformers[serving]' torch
	touch $@

clean:
	rm -rf $(VENV) .venv-eval .venv-serve runs output

# The README's two commands, on a machine with only Python 3.11, git and make:
#
#   make demo    the demo (main.py --config configs/demo.py), in a .venv built from the pins
#   make test    lint, format check and the test suite, in the same .venv plus the test extras
#   make aot     the compile-only tool's extras (requirements-aot.txt) in their own prefix, .aot/
#                (make test installs them too: the suite compiles the smoke steps for a TPU)
#
# The environment is built once and rebuilt only when the pins change. Each install step
# leaves a stamp file in $(VENV) named after the hash of the files it installed from:
#   .stamp-runtime-<hash of requirements.txt + requirements-nodeps.txt>
#   .stamp-test-<hash of requirements-test*.txt + the torch and onnx extras' files>
# A stamp with the current hash means that step is done (a second `make test` installs
# nothing); a change of pins changes the name, so the step runs again (by content, not
# mtime: a git checkout that leaves the pins as they were reinstalls nothing). A change of runtime
# pins rebuilds $(VENV) from scratch (no package of the old pins is left behind); a change of
# test pins installs them over the runtime environment. The editable install of this
# repository (pip install --no-deps -e .) has a plain stamp, redone when pyproject.toml is
# newer than it.
#
# Variables: PYTHON (the interpreter to build the venv with), VENV, WORKDIR (the demo's),
# PYTEST_ARGS (passed to pytest, e.g. PYTEST_ARGS="tests/models/test_ssd.py -q"), LINT=0
# (make test without the ruff steps), TEST_WORKERS (pytest-xdist processes, a test file to each;
# 2 suits the 2-core CI machine, 0 runs the suite in this process).

PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= /tmp/demo
PYTEST_ARGS ?=
LINT ?= 1
TEST_WORKERS ?= 2
AOT ?= .aot

BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q --disable-pip-version-check

# The first 16 hex digits of the sha256 of the files named ($(PYTHON): no sha256sum needed).
hash = $(shell cat $(1) | $(PYTHON) -c \
  "import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])")
RUNTIME_PINS := requirements.txt requirements-nodeps.txt
TEST_PINS := requirements-test.txt requirements-torch.txt requirements-onnx.txt \
  requirements-test-nodeps.txt
RUNTIME_STAMP := $(VENV)/.stamp-runtime-$(call hash,$(RUNTIME_PINS))
TEST_STAMP := $(VENV)/.stamp-test-$(call hash,$(TEST_PINS))
EDITABLE_STAMP := $(VENV)/.stamp-editable
AOT_STAMP := $(AOT)/.stamp-$(call hash,requirements-aot.txt)

.PHONY: demo test aot lint format clean
.NOTPARALLEL:  # the install steps share one venv: never two pips at once, even under -j

demo: $(EDITABLE_STAMP)
	$(BIN)/python main.py --config configs/demo.py --workdir $(WORKDIR)

test: $(TEST_STAMP) $(EDITABLE_STAMP) $(AOT_STAMP)
ifneq ($(LINT),0)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
endif
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(TEST_STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

aot: $(AOT_STAMP)

clean:
	rm -rf $(VENV) $(AOT) *.egg-info build

# The runtime pins. Another runtime stamp in $(VENV) means other pins: start afresh.
$(RUNTIME_STAMP):
	@if ls $(VENV)/.stamp-runtime-* >/dev/null 2>&1; then \
	  echo "make: the runtime pins changed; rebuilding $(VENV)"; rm -rf $(VENV); fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	$(PIP) --no-deps -r requirements-nodeps.txt
	touch $@

# The test extras, resolved together with the runtime pins (pip refuses a conflict rather
# than replacing a runtime pin).
$(TEST_STAMP): $(RUNTIME_STAMP)
	rm -f $(VENV)/.stamp-test-*
	$(PIP) -r requirements.txt $(foreach f,$(filter-out %-nodeps.txt,$(TEST_PINS)),-r $(f))
	$(PIP) --no-deps -r requirements-test-nodeps.txt
	touch $@

$(EDITABLE_STAMP): pyproject.toml $(RUNTIME_STAMP)
	$(PIP) --no-deps -e .
	touch $@

# The compile-only extras, apart from $(VENV) (see requirements-aot.txt); new pins: afresh.
$(AOT_STAMP): $(RUNTIME_STAMP)
	rm -rf $(AOT)
	$(PIP) --no-deps --target $(AOT) -r requirements-aot.txt
	touch $@


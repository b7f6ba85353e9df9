# `make test` and `make demo` are each the only command a fresh machine needs:
# they create .venv when it is missing and install kvideo (editable) with its dev extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvideo-installed

.PHONY: test test-all demo install clean-demo

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# `make test`: the suite without the tests marked slow (pytest.ini), under 15 minutes;
# `make test-all`: every test, as CI runs it.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) tools/demo.py --out out/demo

clean-demo:
	rm -rf out/demo

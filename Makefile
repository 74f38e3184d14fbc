# Set-up and the two everyday commands. Both create .venv on first use.
VENV ?= .venv
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(VENV)/bin/python scripts/train.py --overwrite

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

# The README's two commands: `make demo` (main job on the embedded model) and `make test`.
PYTHON ?= python

.PHONY: setup demo test

setup:
	bash scripts/setup.sh

demo: setup
	quantkit chat smollm2-135m --message "What is the capital of France? Answer in one sentence."

test: setup
	$(PYTHON) -m pytest -q

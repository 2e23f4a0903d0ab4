# The README's two commands: `make demo` (the quantize-evaluate-benchmark comparison on the embedded model)
# and `make test`.
PYTHON ?= python

.PHONY: setup demo test

setup:
	bash scripts/setup.sh

demo: setup
	quantkit run recipes/smollm2-compare.yaml

test: setup
	$(PYTHON) -m pytest -q

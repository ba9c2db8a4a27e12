# d7y-node: the commands. `scripts/start` and `scripts/test` are the two set-up commands of the
# README (they need nothing but bash and apt); the targets here are shortcuts for developers.

.PHONY: run test lint unit integration bench bench-mirror bench-p2p bench-lazy system-deps clean

VENV := source scripts/venv.sh dev &&
SHELL := /bin/bash

run:
	scripts/start $(ARGS)

test:
	scripts/test $(ARGS)

system-deps:
	scripts/install-system-deps.sh

lint:
	$(VENV) ruff check . && mypy

unit:
	$(VENV) pytest -q -m "not integration" $(ARGS)

integration: system-deps
	$(VENV) pytest -q -m integration $(ARGS)

bench: bench-mirror bench-p2p bench-lazy

bench-mirror: system-deps
	$(VENV) python bench/mirror.py $(ARGS)

bench-p2p: system-deps
	$(VENV) python bench/p2p.py $(ARGS)

bench-lazy: system-deps
	$(VENV) python bench/lazy.py $(ARGS)

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache

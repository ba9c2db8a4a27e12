# d7y-node: the commands. `scripts/start` and `scripts/test` are the two set-up commands of the
# README (they need nothing but bash and apt); the targets here are shortcuts for developers.

.PHONY: run test lint unit integration bench bench-mirror bench-p2p bench-lazy bench-startup system-deps clean

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

bench: bench-mirror bench-p2p bench-lazy bench-startup

bench-mirror: system-deps
	$(VENV) python bench/mirror.py $(ARGS)

bench-p2p: system-deps
	$(VENV) python bench/p2p.py $(ARGS)

bench-lazy: system-deps
	$(VENV) python bench/lazy.py $(ARGS)

bench-startup: system-deps
	$(VENV) python bench/startup.py $(ARGS)

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache

# The tests' CRI client messages (tests/harness/protos/cri_image.proto); the generated modules
# are committed, so this is needed only after the .proto changes. `# ruff: noqa`: generated code.
.PHONY: test-protos
test-protos:
	$(VENV) cd tests/harness/protos && python -m grpc_tools.protoc -I. --python_out=. \
		--pyi_out=. cri_image.proto && sed -i '1i # ruff: noqa' cri_image_pb2.py cri_image_pb2.pyi

# The containerd snapshots API messages (d7y_node/protos/*.proto, a subset of containerd's with
# its field numbers); the generated modules are committed, so this is needed only after a .proto
# changes. Pinned grpcio-tools (pyproject.toml) keeps them in step with the protobuf runtime.
.PHONY: protos
protos:
	$(VENV) python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \
		d7y_node/protos/mount.proto d7y_node/protos/snapshots.proto

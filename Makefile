# finetune-operator: `make demo` runs the quickstart job on a local control plane;
# `make test` installs everything it needs and runs the unit and integration tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KUBECONFIG_LOCAL := $(CURDIR)/.cluster/kubeconfig
BIN := $(HOME)/.cache/finetune-operator/bin
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
export PATH := $(CURDIR)/$(VENV)/bin:$(BIN):$(PATH)

.PHONY: help venv binaries constraints crds check-crds cluster cluster-down operator test test-unit test-integration demo mutation docs trainer-image image clean

help:
	@echo "make demo | test | cluster | cluster-down | operator | crds | images | push | trainer-image | image"

# The venv is rebuilt when pyproject.toml changes; the stamp records a finished install.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[trainer,dev]'
	touch $@

venv: $(VENV)/.installed

binaries:
	hack/build-binaries.sh >/dev/null

# Pin the versions the suite passes with, for the images.
constraints: venv
	$(PY) -m pip freeze --exclude-editable > constraints.txt

crds: venv
	$(PY) -m finetune_operator.crdgen

check-crds: venv
	$(PY) -m finetune_operator.crdgen --check

cluster:
	hack/cluster.sh up

cluster-down:
	hack/cluster.sh down

# The operator from source, in the foreground, against the local cluster; its trainer pods run
# on local-0 from the imported trainer image, in the node's network (docs/local-node.md).
operator: venv cluster
	KUBECONFIG=$(KUBECONFIG_LOCAL) FINETUNE_METRICS_PORT=18080 FINETUNE_HEALTH_PORT=18081 \
		FINETUNE_PROGRESS_PORT=18082 FINETUNE_PROGRESS_URL=http://127.0.0.1:18082 \
		FINETUNE_TRAINER_IMAGE_PULL_POLICY=Never FINETUNE_TRAINER_HOST_NETWORK=true \
		$(VENV)/bin/finetune-operator

test: venv binaries
	hack/test.sh

test-unit: venv
	hack/test.sh -m "not integration"

demo: venv
	hack/demo.sh

# Mutation testing of the operator's and trainer's core modules (hack/mutation.sh); not in `make test`.
mutation: venv
	hack/mutation.sh

# docs/api.md from the CRD schemas (tests/docs fails when it drifts).
docs: venv
	$(PY) -m finetune_operator.apidocs

# The operator, trainer and pause images without Docker or a registry (buildah + mmdebstrap),
# as OCI archives cached by their inputs' digest; their paths are in
# ~/.cache/finetune-operator/images/current.env. Needs root; a warm run takes seconds.
.PHONY: images
images:
	hack/images.sh

# Push both images, digests unchanged: make push REGISTRY=host/path [TAG=...] [PUSH_TLS_VERIFY=false].
.PHONY: push
push:
	REGISTRY=$(REGISTRY) TAG=$(TAG) PUSH_TLS_VERIFY=$(or $(PUSH_TLS_VERIFY),true) hack/push.sh

# The same Dockerfiles with Docker, FROM the public python:slim base.
trainer-image:
	docker build -f trainer-image/Dockerfile --build-arg REVISION=$$(git rev-parse HEAD) -t finetune-trainer:$(VERSION) .

image:
	docker build --build-arg REVISION=$$(git rev-parse HEAD) -t finetune-operator:$(VERSION) .

clean: cluster-down
	rm -rf $(VENV) *.egg-info

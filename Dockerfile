# syntax=docker/dockerfile:1
# The operator image: the Kopf operator and its API client, no torch.
#   docker build -t finetune-operator:VERSION .   (make image)
# `make images` (hack/images.sh) builds the same file with buildah, FROM a Debian bookworm base
# made with mmdebstrap (PYTHON_BASE=localhost/fto-base:...), since no registry is needed there.
# Both bases are bookworm with Python 3.11: python:slim's is in /usr/local/bin, Debian's in
# /usr/bin; the virtual environment at /opt/venv hides the difference.
ARG PYTHON_BASE=python:3.11.11-slim-bookworm

FROM ${PYTHON_BASE} AS build
# pip verifies TLS with the system CA bundle rather than its own copy (hack/images.sh mounts
# the build host's bundle there during RUN steps, for hosts behind a TLS-inspecting proxy).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints.txt ./
COPY operator ./operator
COPY trainer-image/finetune_trainer ./trainer-image/finetune_trainer
# Base dependencies only: the [trainer] extra (torch, transformers, ...) stays out. Versions are
# pinned by constraints.txt, the set the test suite last passed with (`make constraints`).
# The pip cache is a build cache mount, never a layer. The package's long description
# (README.md) is left empty, so README edits do not rebuild the image.
RUN --mount=type=cache,id=fto-pip,target=/root/.cache/pip \
    touch README.md \
 && pip install -c constraints.txt . \
 && rm /opt/venv/bin/kubectl-finetune  # the CLI is its own package (cli/), not in this image

FROM ${PYTHON_BASE}
ARG VERSION=unknown
ARG REVISION=unknown
# The repository URL (hack/images.sh passes the git remote, when there is one).
ARG SOURCE=
LABEL org.opencontainers.image.title="finetune-operator" \
      org.opencontainers.image.description="Kubernetes operator that turns a FineTuneJob manifest into a fine-tuned model" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
# uid/gid 10001: the chart's podSecurityContext runs the pod as 10001:10001 (Debian already
# has a group named "operator", so the account is "finetune").
RUN groupadd --gid 10001 finetune \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin finetune
COPY --from=build /opt/venv /opt/venv
# Read-only root filesystem: nothing is written at run time (bytecode was compiled at install;
# the chart mounts an emptyDir at /tmp).
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["finetune-operator"]

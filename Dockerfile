# The operator image: the Kopf operator and its API client, no torch.
# Build: docker build -t finetune-operator:0.1.0 .
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY operator ./operator
COPY trainer-image/finetune_trainer ./trainer-image/finetune_trainer
# Base dependencies only: the [trainer] extra (torch, transformers, ...) stays out. Versions are
# pinned by constraints.txt, the set the test suite last passed with (`make constraints`).
RUN pip install --no-cache-dir --prefix=/install -c constraints.txt .

FROM python:3.11.11-slim-bookworm
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin operator
COPY --from=build /install /usr/local
USER 10001:10001
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
EXPOSE 8080 8081
ENTRYPOINT ["finetune-operator"]

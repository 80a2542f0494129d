#!/usr/bin/env bash
# Push the operator and trainer images (the OCI archives hack/images.sh builds, so what is pushed
# is exactly what the tests ran) to a registry, each with its digest unchanged.
#
#   make push REGISTRY=registry.example.com/team [TAG=<version>] [PUSH_TLS_VERIFY=false]
#
# Prints each pushed reference with its digest (REGISTRY/NAME:TAG@sha256:...), one per line; put
# those in the chart's image values to deploy exactly these images. Credentials are skopeo's
# own: `skopeo login REGISTRY`, or REGISTRY_AUTH_FILE pointing at a Docker config file.
# Installs skopeo with apt-get when it is missing (log: ~/.cache/finetune-operator/images/logs/).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
CACHE=${FTO_CACHE:-$HOME/.cache/finetune-operator}/images
LOGS=$CACHE/logs
mkdir -p "$LOGS"

log() { echo "push: $*" >&2; }
[ -n "${REGISTRY:-}" ] || { log "set REGISTRY, e.g. make push REGISTRY=ghcr.io/acme"; exit 2; }
case $REGISTRY in */|*://*) log "REGISTRY is host[:port]/path, without a scheme or a trailing /: $REGISTRY"; exit 2 ;; esac

if ! command -v skopeo >/dev/null; then
  log "installing skopeo with apt-get (log: $LOGS/apt-skopeo.log)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends skopeo >"$LOGS/apt-skopeo.log" 2>&1 \
    || { log "apt-get install skopeo failed; see $LOGS/apt-skopeo.log"; exit 1; }
fi

env_file=$("$here/images.sh" operator trainer)   # builds whatever is missing; a no-op otherwise
# shellcheck source=/dev/null
source "$env_file"
digest_file=$(mktemp)
trap 'rm -f "$digest_file"' EXIT
for which in OPERATOR TRAINER; do
  image_var=${which}_IMAGE archive_var=${which}_IMAGE_ARCHIVE
  image=${!image_var}; archive=${!archive_var}
  name=${image##*/}; name=${name%%:*}
  ref=$REGISTRY/$name:${TAG:-${image##*:}}
  # --preserve-digests: fail rather than convert the manifest, so the digest pushed is the
  # digest built (and imported into the test cluster's containerd).
  skopeo copy --quiet --preserve-digests --dest-tls-verify="${PUSH_TLS_VERIFY:-true}" \
    --digestfile "$digest_file" "oci-archive:$archive" "docker://$ref" >>"$LOGS/push.log" 2>&1 \
    || { log "pushing $ref failed; see $LOGS/push.log"; tail -5 "$LOGS/push.log" >&2; exit 1; }
  echo "$ref@$(cat "$digest_file")"
done

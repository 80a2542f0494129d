#!/usr/bin/env bash
# Build the product's images without Docker or a registry: buildah runs the repository's
# Dockerfiles FROM a Debian bookworm base made here with mmdebstrap, and each image is written as
# an OCI archive named by the digest of its inputs, so an unchanged tree rebuilds nothing.
#
#   hack/images.sh [operator] [trainer] [pause]   build what is missing (default: all three)
#   hack/images.sh verify                           import the current archives into a throwaway
#                                                   containerd and run each image once
#
# Writes, under ${FTO_CACHE:-~/.cache/finetune-operator}/images/:
#   finetune-operator-<digest>.tar, finetune-trainer-<digest>.tar, fto-pause-<digest>.tar
#   current.env   IMAGE and IMAGE_ARCHIVE lines for the three (sourced by the cluster script,
#                 which runs `ctr -n k8s.io images import "$OPERATOR_IMAGE_ARCHIVE"` and so on)
#   logs/         every build's output (nothing but short progress lines reach stderr)
#   storage/      buildah's own storage (--root), never the system's /var/lib/containers
# and prints the path of current.env on stdout. Needs root (mmdebstrap, buildah's chroot
# isolation); installs buildah, mmdebstrap, gcc and libc6-dev with apt-get when they are missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
self=$here/$(basename "$0")

CACHE=${FTO_CACHE:-$HOME/.cache/finetune-operator}/images
LOGS=$CACHE/logs
STORE=$CACHE/storage
RUNROOT=$CACHE/run
WORK=$CACHE/work
ENV_FILE=$CACHE/current.env
# buildah's large temporary files and its RUN --mount=type=cache directories (the pip cache).
export TMPDIR=$CACHE/tmp

log() { echo "images: $*" >&2; }
die() { log "$*"; exit 1; }

want_operator=0 want_trainer=0 want_pause=0 verify=0
[ $# -gt 0 ] || set -- operator trainer pause
for a in "$@"; do
  case $a in
    operator) want_operator=1 ;;
    trainer) want_trainer=1 ;;
    pause) want_pause=1 ;;
    verify) verify=1 ;;
    *) die "unknown argument '$a' (operator, trainer, pause, verify)" ;;
  esac
done

[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap, buildah --isolation chroot)"
mkdir -p "$LOGS" "$STORE" "$RUNROOT" "$WORK" "$TMPDIR"
exec 9>"$CACHE/.lock"
flock -n 9 || { log "waiting for another hack/images.sh ($CACHE/.lock)"; flock 9; }

# ---- names, versions, inputs ----

# Image tags follow the chart's appVersion (the chart runs finetune-operator:<appVersion>);
# docker.io/library/NAME:TAG is what containerd normalises the chart's short names to.
VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$root/charts/finetune-operator/Chart.yaml")
PY_VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml" | head -n1)
[ -n "$VERSION" ] || die "no appVersion in charts/finetune-operator/Chart.yaml"
[ "$VERSION" = "$PY_VERSION" ] || log "warning: Chart.yaml appVersion $VERSION != pyproject.toml version $PY_VERSION; tagging $VERSION"
OPERATOR_IMAGE=docker.io/library/finetune-operator:$VERSION
TRAINER_IMAGE=docker.io/library/finetune-trainer:$VERSION
PAUSE_IMAGE=localhost/fto-pause:1
# The repository URL for org.opencontainers.image.source, without any credentials in it; only
# a URL (a clone of a local path has none to give), so a local clone of this tree has the same
# digests and reuses its images.
SOURCE=$(git -C "$root" config --get remote.origin.url 2>/dev/null | sed 's#//[^/@]*@#//#' || true)
case $SOURCE in http://* | https://* | ssh://* | git@*) ;; *) SOURCE= ;; esac

# The Debian base: its digest is the digest of this recipe (mmdebstrap's arguments and the
# image config), not of the packages it fetched; delete $CACHE to take newer packages.
# shellcheck disable=SC2016,SC2054  # the hook's $1 is mmdebstrap's; the commas are its list
BASE_ARGS=(
  --variant=apt
  --include=python3,python3-venv,ca-certificates,libgomp1,passwd
  --aptopt='Acquire::Languages "none"'
  # Kept in the image's dpkg config, so packages installed later in the Dockerfiles skip them too.
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  # The build host's resolver and name stay out; runtimes mount their own over these.
  --customize-hook='for f in etc/resolv.conf etc/hostname; do rm -f "$1/$f"; : >"$1/$f"; done'
  bookworm
)
BASE_CONFIG=(
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  --env LANG=C.UTF-8
  --cmd '["/bin/bash"]'
  --label org.opencontainers.image.title=fto-base
  --label "org.opencontainers.image.description=Debian bookworm (mmdebstrap) with Python 3, for the finetune-operator images"
)

# The files an image is built from: git's tracked and untracked-but-not-ignored files under
# the given paths (what the build context holds), bytecode caches excluded.
input_files() {
  (
    cd "$root"
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      git ls-files -z --cached --others --exclude-standard -- "$@"
    else
      find "$@" -type f -print0
    fi | sort -zu | while IFS= read -r -d '' f; do
      case /$f in */__pycache__/* | *.pyc) continue ;; esac
      [ -f "$f" ] && printf '%s\0' "$f"
    done
  )
}

# digest NAME FUNCTIONS PATH...: the digest of an image's inputs: the files' names and
# contents, the version, the base recipe's digest and the text of this script's functions
# that build it (FUNCTIONS, space-separated), so edits elsewhere in the script (logging,
# verify) do not rebuild a 6 GB image.
digest() {
  local name=$1 funcs=$2
  shift 2
  {
    printf '%s\n' "$name" "$VERSION" "$SOURCE" "$BASE_DIGEST"
    # shellcheck disable=SC2086  # a list of names
    declare -f $funcs
    input_files "$@" | (cd "$root" && xargs -0 -r sha256sum)
  } | sha256sum | cut -c1-16
}

# revision PATH...: the last commit that touched the inputs (+ "-dirty" when they differ from
# it), for org.opencontainers.image.revision. Not HEAD: unrelated commits would then either
# rebuild the image or leave a label that names a commit the image was not built from.
revision() {
  local rev
  rev=$(git -C "$root" log -1 --format=%H -- "$@" 2>/dev/null) || true
  [ -n "$rev" ] || { echo unknown; return; }
  if [ -n "$(git -C "$root" status --porcelain -- "$@" 2>/dev/null)" ]; then rev=$rev-dirty; fi
  echo "$rev"
}

# ---- tools ----

ensure_tools() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  command -v gcc >/dev/null || missing+=(gcc)
  [ -f /usr/include/stdio.h ] && [ -f "$(gcc -print-file-name=libc.a 2>/dev/null)" ] || missing+=(libc6-dev)
  command -v unshare >/dev/null || missing+=(util-linux)
  [ "${#missing[@]}" -eq 0 ] && return
  log "installing ${missing[*]} with apt-get (log: $LOGS/apt.log)"
  {
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
  } >>"$LOGS/apt.log" 2>&1 || die "apt-get install failed, see $LOGS/apt.log"
}

# buildah on this script's own storage. Each call runs in a private mount namespace with a
# tmpfs over /var/lib: buildah's commit and push write a blob-info cache to
# /var/lib/containers/cache whatever --root says, and this keeps it off the system's directory.
# The namespace ends with the call, taking any mounts buildah made with it.
BUILDAH=() USE_NS=0
bah() {
  if [ "$USE_NS" = 1 ]; then
    unshare --mount --propagation slave -- \
      sh -c 'mount -t tmpfs -o mode=0755,size=64m fto-varlib /var/lib && exec "$@"' bah "${BUILDAH[@]}" "$@"
  else
    "${BUILDAH[@]}" "$@"
  fi
}

# overlay where the kernel takes it on this filesystem (as root it does on ext4/xfs), else vfs
# (a full copy per layer: slow and large). Chosen once per storage root.
setup_buildah() {
  [ "${#BUILDAH[@]}" -eq 0 ] || return 0
  ensure_tools
  USE_NS=0
  if unshare --mount --propagation slave -- sh -c 'mount -t tmpfs fto-probe /var/lib' 2>/dev/null; then
    USE_NS=1
  else
    log "warning: no mount namespace here; buildah will write its blob-info cache to /var/lib/containers/cache"
  fi
  local driver probe
  if [ -f "$CACHE/storage-driver" ]; then
    driver=$(cat "$CACHE/storage-driver")
  else
    probe=$(mktemp -d "$CACHE/probe.XXXXXX")
    driver=vfs
    BUILDAH=(buildah --root "$probe/root" --runroot "$probe/run" --storage-driver overlay)
    if bah from --name fto-probe scratch >>"$LOGS/probe.log" 2>&1 &&
      bah copy fto-probe "$self" /probe >>"$LOGS/probe.log" 2>&1 &&
      bah commit --rm fto-probe localhost/fto-probe:1 >>"$LOGS/probe.log" 2>&1; then
      driver=overlay
    fi
    bah rm --all >>"$LOGS/probe.log" 2>&1 || true
    rm -rf "$probe"
    echo "$driver" >"$CACHE/storage-driver"
  fi
  BUILDAH=(buildah --root "$STORE" --runroot "$RUNROOT" --storage-driver "$driver")
  log "buildah $(buildah --version | awk '{print $3}'), storage driver $driver, root $STORE"
}

VERIFY_PID="" VERIFY_DIR=""
cleanup() {
  local rc=$?
  trap - PIPE
  stop_verify_containerd
  rm -f "$CACHE"/*.tar.tmp "$ENV_FILE.tmp"
  rm -rf "$WORK"
  if [ "${#BUILDAH[@]}" -gt 0 ]; then bah rm --all >/dev/null 2>&1 || true; fi
  exit "$rc"
}
trap cleanup EXIT
# A signal (or a closed stderr) ends the script through cleanup too.
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 141' PIPE

# Keeps only the newest archive of an image.
prune_archives() { # PREFIX KEEP
  local f
  for f in "$CACHE/$1"-*.tar; do
    [ -e "$f" ] && [ "$f" != "$2" ] && rm -f "$f"
  done
  return 0
}

# Writes IMAGE (a local image) to ARCHIVE as an oci-archive named REF, then removes the image.
export_image() { # IMAGE ARCHIVE REF LOG
  bah push --quiet "$1" "oci-archive:$2.tmp:$3" >>"$4" 2>&1 || die "push of $3 failed, see $4"
  tar -xOf "$2.tmp" index.json | grep -q "\"org.opencontainers.image.ref.name\":\"$3\"" ||
    die "$2.tmp: index.json does not name $3"
  mv "$2.tmp" "$2"
  bah rmi "$1" >>"$4" 2>&1 || true
  bah rmi --prune >>"$4" 2>&1 || true
}

size() { du -h --apparent-size "$1" | cut -f1; }

# ---- the base ----

build_base() {
  setup_buildah
  if bah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then return; fi
  local t0=$SECONDS l=$LOGS/base.log old
  log "base $BASE_IMAGE: mmdebstrap bookworm (about 2 min; log: $l)"
  : >"$l"
  mkdir -p "$WORK/base"
  mmdebstrap "${BASE_ARGS[@]}" "$WORK/base/rootfs.tar" >>"$l" 2>&1 || die "mmdebstrap failed, see $l"
  # mmdebstrap's tarball carries device nodes for a chroot; container runtimes make their own /dev.
  tar --delete --wildcards -f "$WORK/base/rootfs.tar" './dev/?*' >>"$l" 2>&1 || die "tar --delete failed, see $l"
  bah rm fto-base-work >/dev/null 2>&1 || true
  {
    bah from --name fto-base-work scratch &&
      bah add fto-base-work "$WORK/base/rootfs.tar" / &&
      bah config --created-by "mmdebstrap ${BASE_ARGS[*]} (hack/images.sh)" "${BASE_CONFIG[@]}" fto-base-work &&
      bah commit --rm fto-base-work "$BASE_IMAGE"
  } >>"$l" 2>&1 || die "importing the base failed, see $l"
  rm -rf "$WORK/base"
  for old in $(bah images --format '{{.Name}}:{{.Tag}}' 2>/dev/null | grep '^localhost/fto-base:' | grep -v ":$BASE_DIGEST\$"); do
    bah rmi "$old" >>"$l" 2>&1 || true
  done
  log "base $BASE_IMAGE: done in $((SECONDS - t0)) s"
}

# ---- operator and trainer: buildah bud of the repository's Dockerfiles ----

build_app() { # NAME DOCKERFILE DIGEST ARCHIVE REF INPUTS...
  local name=$1 file=$2 dig=$3 archive=$4 ref=$5 prefix
  shift 5
  prefix=$(basename "${archive%-*}")
  if [ -f "$archive" ]; then
    log "$name: $ref up to date ($(basename "$archive"))"
    return
  fi
  build_base
  local t0=$SECONDS l=$LOGS/$name.log tag=localhost/fto-build/$name:$dig rev
  rev=$(revision "$@")
  log "$name: building $ref from $file (log: $l)"
  : >"$l"
  # RUN steps see the build host's CA bundle (in place of the base's, never in a layer), so pip
  # also works behind a TLS-inspecting proxy whose CA only the host trusts.
  local ca=()
  [ ! -f /etc/ssl/certs/ca-certificates.crt ] ||
    ca=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
  bah bud --isolation chroot --pull=never --layers=false --force-rm --format oci "${ca[@]}" \
    --build-arg "PYTHON_BASE=$BASE_IMAGE" --build-arg "VERSION=$VERSION" \
    --build-arg "REVISION=$rev" --build-arg "SOURCE=$SOURCE" \
    -f "$root/$file" -t "$tag" "$root" >>"$l" 2>&1 || {
    tail -n 15 "$l" | sed 's/^/    /' >&2
    die "$name: build failed, see $l"
  }
  local t1=$SECONDS
  export_image "$tag" "$archive" "$ref" "$l"
  prune_archives "$prefix" "$archive"
  log "$name: done in $((SECONDS - t0)) s (build $((t1 - t0)) s, export $((SECONDS - t1)) s), $(size "$archive") archive"
  echo "$(date -u +%FT%TZ) $name $dig build=$((t1 - t0))s export=$((SECONDS - t1))s archive=$(stat -c %s "$archive")" >>"$LOGS/times.log"
}

# ---- pause: the sandbox image for containerd ----

build_pause() {
  if [ -f "$PAUSE_ARCHIVE" ]; then
    log "pause: $PAUSE_IMAGE up to date ($(basename "$PAUSE_ARCHIVE"))"
    return
  fi
  setup_buildah
  local t0=$SECONDS l=$LOGS/pause.log tag=localhost/fto-build/pause:$PAUSE_DIGEST
  log "pause: building $PAUSE_IMAGE (log: $l)"
  : >"$l"
  mkdir -p "$WORK/pause"
  gcc -Os -Wall -Wextra -static -s -o "$WORK/pause/pause" "$root/hack/pause/pause.c" >>"$l" 2>&1 ||
    die "pause: gcc failed, see $l"
  bah rm fto-pause-work >/dev/null 2>&1 || true
  {
    bah from --name fto-pause-work scratch &&
      bah copy --chmod 0755 fto-pause-work "$WORK/pause/pause" /pause &&
      bah config --created-by "gcc -static hack/pause/pause.c (hack/images.sh)" --entrypoint '["/pause"]' --user 65535:65535 \
        --label org.opencontainers.image.title=fto-pause \
        --label "org.opencontainers.image.description=Pod sandbox (pause) process for the local node's containerd" \
        --label "org.opencontainers.image.revision=$(revision "${PAUSE_INPUTS[@]}")" \
        --label "org.opencontainers.image.source=$SOURCE" fto-pause-work &&
      bah commit --rm fto-pause-work "$tag"
  } >>"$l" 2>&1 || die "pause: image failed, see $l"
  export_image "$tag" "$PAUSE_ARCHIVE" "$PAUSE_IMAGE" "$l"
  prune_archives fto-pause "$PAUSE_ARCHIVE"
  log "pause: done in $((SECONDS - t0)) s, $(size "$PAUSE_ARCHIVE") archive"
}

# ---- current.env ----

# The archive of an image: the one for the current inputs, else the newest one there is (an
# image this run was not asked to build), else none.
archive_of() { # PREFIX CURRENT
  if [ -f "$2" ]; then echo "$2"; return; fi
  # shellcheck disable=SC2012  # the names are this script's own
  ls -t "$CACHE/$1"-*.tar 2>/dev/null | head -n1 || true
}

write_env() {
  local op tr pa
  op=$(archive_of finetune-operator "$OPERATOR_ARCHIVE")
  tr=$(archive_of finetune-trainer "$TRAINER_ARCHIVE")
  pa=$(archive_of fto-pause "$PAUSE_ARCHIVE")
  {
    echo "# Written by hack/images.sh. Source it; import with ctr -n k8s.io images import \"\$X_IMAGE_ARCHIVE\"."
    printf 'OPERATOR_IMAGE=%q\n' "$OPERATOR_IMAGE"
    [ -z "$op" ] || printf 'OPERATOR_IMAGE_ARCHIVE=%q\n' "$op"
    printf 'TRAINER_IMAGE=%q\n' "$TRAINER_IMAGE"
    [ -z "$tr" ] || printf 'TRAINER_IMAGE_ARCHIVE=%q\n' "$tr"
    printf 'PAUSE_IMAGE=%q\n' "$PAUSE_IMAGE"
    [ -z "$pa" ] || printf 'PAUSE_IMAGE_ARCHIVE=%q\n' "$pa"
  } >"$ENV_FILE.tmp"
  if cmp -s "$ENV_FILE.tmp" "$ENV_FILE"; then rm -f "$ENV_FILE.tmp"; else mv "$ENV_FILE.tmp" "$ENV_FILE"; fi
  local n
  for n in operator:"$op":"$OPERATOR_ARCHIVE" trainer:"$tr":"$TRAINER_ARCHIVE" pause:"$pa":"$PAUSE_ARCHIVE"; do
    IFS=: read -r n have cur <<<"$n"
    if [ -z "$have" ]; then log "$n: not built yet (hack/images.sh $n)"
    elif [ "$have" != "$cur" ]; then log "$n: current.env names an archive of older inputs (hack/images.sh $n)"; fi
  done
}

# ---- verify: a throwaway containerd imports the archives and runs each image once ----

SMOKE_RO='
try:
    open("/fto-verify", "w")
    raise SystemExit("the root filesystem is writable")
except OSError:
    pass'
SMOKE_OPERATOR='import os, kopf, kr8s, finetune_operator.main'"$SMOKE_RO"'
print("uid", os.getuid(), "operator imports")'
# The trainer's smoke run is a real one: two LoRA steps on preset://tiny-llama on CPU (which
# also JIT-builds DeepSpeed's CPU comm op under HOME=/tmp, as a CPU node's pod does).
SMOKE_TRAINER='import json, os, torch, transformers, peft, deepspeed, liger_kernel'"$SMOKE_RO"'
import deepspeed.ops.adam.cpu_adam_op
from deepspeed.git_version_info import installed_ops, accelerator_name
assert installed_ops["cpu_adam"] and accelerator_name == "cuda", (installed_ops, accelerator_name)
d = "/tmp/smoke"
os.makedirs(d)
with open(d + "/train.jsonl", "w") as f:
    for a in range(16):
        f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {a}?"},
                                         {"role": "assistant", "content": f"{a} plus {a} is {2 * a}."}]}) + "\n")
config = {"jobName": "smoke", "baseModel": {"source": "preset://tiny-llama"},
          "dataset": {"path": d + "/train.jsonl", "validationSplit": 0.0},
          "method": {"type": "lora", "lora": {"r": 4, "alpha": 8}},
          "training": {"maxSteps": 2, "microBatchSize": 2, "globalBatchSize": 4, "maxSeqLength": 64},
          "output": {"dir": d + "/out"}}
with open(d + "/config.json", "w") as f:
    json.dump(config, f)
from finetune_trainer.cli import main
rc = main(["--config", d + "/config.json"])
assert rc == 0, rc
result = json.load(open(d + "/out/result.json"))
print("uid", os.getuid(), "torch", torch.__version__, "deepspeed", deepspeed.__version__,
      "cpu_adam prebuilt, 2 CPU steps, train loss", round(result["metrics"]["trainLoss"], 3))'

smoke() { # NAME COMMAND...
  local name=$1 t0=$SECONDS out
  shift
  if out=$("$@" 2>>"$LOGS/verify.log"); then
    echo "$out" >>"$LOGS/verify.log"
    log "verify: $name runs: $(tail -n1 <<<"$out") ($((SECONDS - t0)) s)"
  else
    echo "$out" >>"$LOGS/verify.log"
    log "verify: $name failed to run, see $LOGS/verify.log"
    return 1
  fi
}

# Stops verify's throwaway containerd (by its pid) and removes its directory.
stop_verify_containerd() {
  if [ -n "$VERIFY_PID" ]; then
    kill "$VERIFY_PID" 2>/dev/null || true
    wait "$VERIFY_PID" 2>/dev/null || true
    VERIFY_PID=""
  fi
  if [ -n "$VERIFY_DIR" ]; then
    # A run that failed half-way can leave its rootfs mounted there.
    awk -v d="$VERIFY_DIR/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r | xargs -r umount -l
    rm -rf "$VERIFY_DIR"
    VERIFY_DIR=""
  fi
}

verify_archives() {
  command -v containerd >/dev/null || {
    log "installing containerd with apt-get (log: $LOGS/apt.log)"
    { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y containerd; } >>"$LOGS/apt.log" 2>&1 ||
      die "apt-get install containerd failed, see $LOGS/apt.log"
  }
  # shellcheck source=/dev/null
  source "$ENV_FILE"
  local d pid l=$LOGS/verify.log ok=1
  d=$(mktemp -d "$CACHE/verify.XXXXXX")
  VERIFY_DIR=$d
  cat >"$d/config.toml" <<EOF
version = 2
root = "$d/root"
state = "$d/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$d/containerd.sock"
[ttrpc]
  address = "$d/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
EOF
  : >"$l"
  containerd --config "$d/config.toml" >>"$l" 2>&1 &
  pid=$!
  VERIFY_PID=$pid
  for _ in $(seq 50); do [ -S "$d/containerd.sock" ] && break; sleep 0.2; done
  local pair name archive t0
  for pair in "$OPERATOR_IMAGE=${OPERATOR_IMAGE_ARCHIVE:-}" "$TRAINER_IMAGE=${TRAINER_IMAGE_ARCHIVE:-}" "$PAUSE_IMAGE=${PAUSE_IMAGE_ARCHIVE:-}"; do
    name=${pair%%=*} archive=${pair#*=}
    [ -n "$archive" ] || { log "verify: $name has no archive"; ok=0; continue; }
    t0=$SECONDS
    if ctr -a "$d/containerd.sock" -n k8s.io images import "$archive" >>"$l" 2>&1 &&
      ctr -a "$d/containerd.sock" -n k8s.io images ls -q | grep -qx "$name"; then
      log "verify: $name imports from $(basename "$archive") ($((SECONDS - t0)) s)"
    else
      log "verify: $name did not import from $archive, see $l"
      ok=0
    fi
  done
  ctr -a "$d/containerd.sock" -n k8s.io images ls >>"$l" 2>&1 || true
  # Each image runs once as its own user with a read-only root filesystem (runc, its state
  # under the throwaway directory); /tmp is a tmpfs, as the pods' emptyDir is.
  local run=(ctr -a "$d/containerd.sock" -n k8s.io run --rm --read-only --runc-root "$d/runc")
  if [ -n "${PAUSE_IMAGE_ARCHIVE:-}" ]; then
    smoke pause "${run[@]}" "$PAUSE_IMAGE" "fto-verify-pause-$$" /pause -v || ok=0
  fi
  if [ -n "${OPERATOR_IMAGE_ARCHIVE:-}" ]; then
    smoke operator "${run[@]}" "$OPERATOR_IMAGE" "fto-verify-operator-$$" python -c "$SMOKE_OPERATOR" || ok=0
  fi
  if [ -n "${TRAINER_IMAGE_ARCHIVE:-}" ]; then
    smoke trainer "${run[@]}" --mount type=tmpfs,src=tmpfs,dst=/tmp,options=rw:nosuid:nodev \
      --env HF_HUB_OFFLINE=1 --env OMP_NUM_THREADS=1 \
      "$TRAINER_IMAGE" "fto-verify-trainer-$$" python -c "$SMOKE_TRAINER" || ok=0
  fi
  stop_verify_containerd
  [ "$ok" = 1 ] || die "verify failed"
}

# ---- main ----

# The base's digest covers its recipe: mmdebstrap's arguments, the image config and the steps
# that turn the tarball into an image (build_base's own text).
BASE_DIGEST=$(printf '%s\0' "${BASE_ARGS[@]}" "${BASE_CONFIG[@]}" "$(declare -f build_base)" | sha256sum | cut -c1-16)
BASE_IMAGE=localhost/fto-base:$BASE_DIGEST
OPERATOR_INPUTS=(Dockerfile .dockerignore pyproject.toml constraints.txt operator trainer-image/finetune_trainer)
TRAINER_INPUTS=(trainer-image/Dockerfile .dockerignore pyproject.toml constraints.txt trainer-image/finetune_trainer)
PAUSE_INPUTS=(hack/pause)
OPERATOR_DIGEST=$(digest operator "build_app export_image" "${OPERATOR_INPUTS[@]}")
TRAINER_DIGEST=$(digest trainer "build_app export_image" "${TRAINER_INPUTS[@]}")
PAUSE_DIGEST=$(digest pause "build_pause export_image" "${PAUSE_INPUTS[@]}")
OPERATOR_ARCHIVE=$CACHE/finetune-operator-$OPERATOR_DIGEST.tar
TRAINER_ARCHIVE=$CACHE/finetune-trainer-$TRAINER_DIGEST.tar
PAUSE_ARCHIVE=$CACHE/fto-pause-$PAUSE_DIGEST.tar

if [ "$want_operator" = 1 ]; then
  build_app operator Dockerfile "$OPERATOR_DIGEST" "$OPERATOR_ARCHIVE" "$OPERATOR_IMAGE" "${OPERATOR_INPUTS[@]}"
fi
if [ "$want_trainer" = 1 ]; then
  build_app trainer trainer-image/Dockerfile "$TRAINER_DIGEST" "$TRAINER_ARCHIVE" "$TRAINER_IMAGE" "${TRAINER_INPUTS[@]}"
fi
if [ "$want_pause" = 1 ]; then build_pause; fi
write_env
if [ "$verify" = 1 ]; then verify_archives; fi
echo "$ENV_FILE"

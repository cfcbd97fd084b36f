#!/usr/bin/env bash
# Builds the wsgate image on this machine with Debian's podman, without pulling anything: the
# image's files are made here by deploy/image/rootfs.sh (static musl binary built here, this
# machine's Debian CA bundle, deploy/image/etc/{passwd,group}), and the image is deploy/Dockerfile's
# runtime stage, its text from `FROM scratch AS runtime` to the end taken verbatim, whose
# `COPY --from=rootfs` is pointed at that directory with `--build-context rootfs=DIR` (in the
# Dockerfile, `rootfs` is the stage holding the same files built in Docker).
#
#   bash deploy/image/build-local.sh [--export DIR]
#
# Tags localhost/wsgate:<Cargo.toml version>; --export DIR unpacks the image's root filesystem into
# DIR (podman create + podman export). Installs what it needs (rustup's musl target, Debian
# musl-tools and podman). Prints the binary and image sizes. Environment: CARGO_TARGET_DIR
# (default target/), IMAGE (default localhost/wsgate:<version>), ARCH (default this machine's).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
log() { printf '[build-local] %s\n' "$*"; }

export_dir=""
while (($#)); do
  case "$1" in
    --export) export_dir="${2:?--export needs a directory}"; shift 2 ;;
    *) echo "usage: build-local.sh [--export DIR]" >&2; exit 2 ;;
  esac
done

arch="${ARCH:-$(dpkg --print-architecture)}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
image="${IMAGE:-localhost/wsgate:$version}"
target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"

# shellcheck source=.ci/apt-install.sh
source "$ROOT/.ci/apt-install.sh"
missing=()
for package in $(deploy/image/rootfs.sh --debian-packages "$arch") podman; do
  dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q 'ok installed' || missing+=("$package")
done
if ((${#missing[@]})); then
  log "installing the Debian packages ${missing[*]}"
  apt_install "${missing[@]}"
fi

work="$target_dir/image-build"
rm -rf "$work"
mkdir -p "$work/context"
start=$SECONDS
deploy/image/rootfs.sh "$arch" "$work/rootfs"
log "rootfs built in $((SECONDS - start)) s"

sed -n '/^FROM scratch AS runtime$/,$p' deploy/Dockerfile >"$work/Containerfile"
grep -q '^ENTRYPOINT' "$work/Containerfile" || { echo "no runtime stage found in deploy/Dockerfile" >&2; exit 1; }
previous="$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
podman build --quiet --network=none --platform "linux/$arch" \
  --build-context "rootfs=$work/rootfs" -f "$work/Containerfile" -t "$image" "$work/context" >/dev/null
log "built $image"
# The image this tag named before, now untagged, is not left behind (kept if anything still uses it).
if [[ -n "$previous" && "$previous" != "$(podman image inspect --format '{{.Id}}' "$image")" ]]; then
  podman rmi "$previous" >/dev/null 2>&1 || true
fi

if [[ -n "$export_dir" ]]; then
  container="$(podman create "$image")"
  rm -rf "$export_dir"
  mkdir -p "$export_dir"
  podman export "$container" | tar -x -C "$export_dir"
  podman rm "$container" >/dev/null
  log "root filesystem of $image in $export_dir"
fi

log "binary: $(stat -c %s "$work/rootfs/wsgate") bytes (stripped); image: $(podman image inspect "$image" --format '{{.Size}}') bytes"

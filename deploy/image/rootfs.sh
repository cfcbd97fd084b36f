#!/usr/bin/env bash
# Lays out the container image's root filesystem in DIR: wsgate built as a static, stripped musl
# binary (/wsgate), the CA bundle of this machine's Debian ca-certificates package, without any CA
# added locally (/etc/ssl/certs/ca-certificates.crt, read by rediss:// through rustls-native-certs) and the
# /etc/passwd and /etc/group beside this script (root and nonroot = 65532).
#
# The one recipe for the image's files: deploy/Dockerfile's build stage runs it (Debian bookworm,
# cross-compiling for TARGETARCH) and so does deploy/image/build-local.sh on this machine.
#
#   rootfs.sh ARCH DIR                 build and lay out; ARCH = amd64 | arm64 (Docker's TARGETARCH,
#                                      which are also Debian's architecture names); DIR is replaced
#   rootfs.sh --debian-packages ARCH   the Debian packages the build of ARCH needs on this machine
#
# A C compiler is needed: ring (rustls's crypto provider, for rediss://) has C and assembly. On the
# same architecture that is Debian's musl-gcc (musl-tools); for the other one, Debian's cross gcc
# (gcc-aarch64-linux-gnu or gcc-x86-64-linux-gnu, with libc6-dev-<arch>-cross for the C headers),
# which also links: Rust's musl targets bring their own musl libc and start files, so no libc of the
# compiler ends up in the binary.
# Environment: CARGO_TARGET_DIR (default target/ of the repository).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

die() { echo "rootfs.sh: $*" >&2; exit 1; }

mode=build
if [[ "${1:-}" == --debian-packages ]]; then
  mode=packages
  shift
fi
arch="${1:-}"
case "$arch" in
  amd64) triple=x86_64-unknown-linux-musl gnu=x86_64-linux-gnu ;;
  arm64) triple=aarch64-unknown-linux-musl gnu=aarch64-linux-gnu ;;
  *) die "usage: rootfs.sh [--debian-packages] amd64|arm64 [DIR] (got '${arch}')" ;;
esac

if [[ "$(dpkg --print-architecture)" == "$arch" ]]; then
  cc=musl-gcc package=musl-tools
else
  # The cross gcc and the C headers it compiles against (Debian's glibc ones: ring needs only the
  # freestanding basics, and links no libc of its own).
  cc="$gnu-gcc" package="gcc-${gnu//_/-} libc6-dev-$arch-cross"
fi
if [[ "$mode" == packages ]]; then
  echo "$package ca-certificates"
  exit 0
fi

out="${2:-}"
[[ -n "$out" ]] || die "usage: rootfs.sh ARCH DIR"
command -v "$cc" >/dev/null || die "$cc not found (Debian packages $package)"
[[ -f /etc/ca-certificates.conf ]] || die "/etc/ca-certificates.conf not found (Debian package ca-certificates)"
if ! rustup target list --installed | grep -qx "$triple"; then
  rustup target add "$triple"
fi

# cc-rs (ring's build script) takes CC_<triple>; cargo takes the linker per target (the host's cc
# links the native musl target, as rustup's musl targets expect).
var="${triple//-/_}"
export "CC_${var}=$cc"
if [[ "$cc" != musl-gcc ]]; then
  export "CARGO_TARGET_${var^^}_LINKER=$cc"
fi
# The release profile keeps line tables for local profiling; the image needs none of it.
export CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols
(cd "$ROOT" && cargo build --release --locked --target "$triple" --bin wsgate)
bin="${CARGO_TARGET_DIR:-$ROOT/target}/$triple/release/wsgate"

# Static (no program interpreter, no shared library needed) and stripped (no symbol table).
headers="$(readelf -lW "$bin")"
! grep -q 'Requesting program interpreter' <<<"$headers" || die "$bin has a program interpreter (not static)"
! readelf -dW "$bin" | grep -q '(NEEDED)' || die "$bin needs shared libraries"
! readelf -SW "$bin" | grep -q ' \.symtab ' || die "$bin is not stripped"

rm -rf "$out"
install -D -m 0755 "$bin" "$out/wsgate"
# The bundle of Debian's ca-certificates as /etc/ca-certificates.conf selects it, made the way
# update-ca-certificates makes /etc/ssl/certs/ca-certificates.crt but without the certificates added
# locally under /usr/local/share/ca-certificates: a build machine's own CAs (a proxy's) stay out.
mkdir -p "$out/etc/ssl/certs"
while read -r cert; do
  case "$cert" in '' | '#'* | '!'*) continue ;; esac
  cat "/usr/share/ca-certificates/$cert"
done </etc/ca-certificates.conf >"$out/etc/ssl/certs/ca-certificates.crt"
chmod 0644 "$out/etc/ssl/certs/ca-certificates.crt"
[[ "$(grep -c 'BEGIN CERTIFICATE' "$out/etc/ssl/certs/ca-certificates.crt")" -gt 100 ]] || die "the CA bundle has too few certificates"
install -D -m 0644 "$HERE/etc/passwd" "$out/etc/passwd"
install -D -m 0644 "$HERE/etc/group" "$out/etc/group"
echo "rootfs.sh: $out: wsgate $(stat -c %s "$out/wsgate") bytes ($triple, static, stripped)"

#!/usr/bin/env bash
# Builds the Moontide container image FROM scratch: the binary, every shared library `ldd`
# lists for it and the dynamic loader, at the paths `ldd` lists (the binary is linked against
# the build machine's glibc; a static musl build is not available here), the build
# machine's CA bundle and an /etc/nsswitch.conf.
#
#   deploy/container/build.sh BINARY TAG
#
# BINARY is a release build with cluster mode:
#   cargo build --release --locked --features etcd   # -> target/release/moontide
# The image runs as user 65532:65532, entrypoint /moontide, data dir /data.
# Builds with `podman build`; set CONTAINER_BUILD to another command that takes
# `-t TAG -f FILE DIR` (e.g. "buildah bud"). Podman's storage and engine settings come from
# its usual configuration (CONTAINERS_STORAGE_CONF, CONTAINERS_CONF).
set -euo pipefail

if [ "$#" -ne 2 ]; then
    echo "usage: $0 BINARY TAG" >&2
    exit 2
fi
binary=$1
tag=$2
here=$(cd "$(dirname "$0")" && pwd)

if [ ! -x "$binary" ]; then
    echo "$0: $binary is not an executable file" >&2
    exit 1
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/rootfs" "$context/data"
install -m 0755 "$binary" "$context/rootfs/moontide"

# `ldd` prints `name => /path (addr)` for each library, `/path (addr)` for the loader and
# `name (addr)` for the kernel's vDSO (not a file: skipped). A library it cannot find is a
# build machine problem, not something to leave out of the image.
if ! listing=$(ldd "$binary" 2>&1); then
    case "$listing" in
    *"not a dynamic executable"* | *"statically linked"*) listing="" ;;
    *)
        echo "$0: ldd $binary failed: $listing" >&2
        exit 1
        ;;
    esac
fi
if grep -q "not found" <<<"$listing"; then
    echo "$0: $binary links libraries this machine lacks:" >&2
    echo "$listing" >&2
    exit 1
fi
libraries=$(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$listing")
for library in $libraries; do
    mkdir -p "$context/rootfs$(dirname "$library")"
    # -L: the file itself where the path is a symlink (/lib64/ld-linux-x86-64.so.2 is one).
    cp -L "$library" "$context/rootfs$library"
done

# The CA bundle: the node builds the outbound HTTP client of functions' `http` module at
# start, and that client needs a root store (without one the node does not start).
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
if [ ! -f "$ca_bundle" ]; then
    echo "$0: no CA bundle at $ca_bundle (Debian: the ca-certificates package; or set CA_BUNDLE)" >&2
    exit 1
fi
mkdir -p "$context/rootfs/etc/ssl/certs"
cp -L "$ca_bundle" "$context/rootfs/etc/ssl/certs/ca-certificates.crt"

# Host lookups: /etc/hosts first (Kubernetes writes the pod's own names and hostAliases
# there), then DNS. Without this file glibc asks DNS first. glibc carries both lookups itself
# (since 2.34): no NSS module to copy.
printf 'hosts: files dns\n' >"$context/rootfs/etc/nsswitch.conf"

cp "$here/Containerfile" "$context/Containerfile"
${CONTAINER_BUILD:-podman build} -t "$tag" -f "$context/Containerfile" "$context"

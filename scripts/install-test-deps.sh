#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine with the Rust toolchain.
# Safe to run again: it installs only what is missing.
set -euo pipefail

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v unzip >/dev/null 2>&1 || need_apt+=(unzip)
# Debian's prometheus package ships both binaries the Prometheus tests run. Its postinst
# may start a system prometheus on :9090 (not where policy-rc.d forbids it, as in Docker
# images); that is harmless: the tests start their own on free ports.
{ command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } \
    || need_apt+=(prometheus)
# Debian's etcd packages: `etcd` and `etcdctl` for the cluster tests (the harness starts its
# own etcd on free ports; the package's service is not needed). `protoc` builds etcd-client.
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need_apt+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
# Debian's redis-server package: the `redis` module's tests start their own on free ports.
# Its postinst may start a system redis on :6379; harmless, as for prometheus.
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# Podman builds and runs the container image in crates/moontide/tests/container_image.rs,
# as root, with runc: Debian's default runtime, crun, refuses a machine whose cgroup v2
# hierarchy is mounted beside v1 (hybrid), as on the machines here.
command -v podman >/dev/null 2>&1 || need_apt+=(podman)
command -v runc >/dev/null 2>&1 || need_apt+=(runc)
# deploy/container/build.sh puts the CA bundle into the image.
[ -f /etc/ssl/certs/ca-certificates.crt ] || need_apt+=(ca-certificates)
# The deploy tests' Python tools go into a venv (below); Debian's own python3 needs this
# package for that (a pyenv or python.org build has it built in).
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ "${#need_apt[@]}" -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# The deploy tests' Python packages (kubernetes-validate, KEDA's CRD models), pinned in
# scripts/test-requirements.txt, in a venv of their own at $MOONTIDE_TEST_VENV (default
# ~/.cache/moontide/test-venv, where crates/moontide/tests/deploy_manifests.rs looks).
# Rebuilt whenever the requirements change.
requirements="$(cd "$(dirname "$0")" && pwd)/test-requirements.txt"
venv="${MOONTIDE_TEST_VENV:-$HOME/.cache/moontide/test-venv}"
if ! cmp -s "$requirements" "$venv/requirements.txt"; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/requirements.txt"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi

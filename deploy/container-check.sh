#!/usr/bin/env bash
# Builds the Dockerfile with podman on a machine that reaches no container
# registry, and runs the runtime stage's files against the simulator. How
# issue 26's packaging point was checked (2026-12-02); run by hand, as
# root, not in CI.
#
#   deploy/container-check.sh
#
# The base images come from debootstrap: localhost/debian:bookworm-slim,
# and localhost/rust:1-bookworm (that plus this machine's stable Rust
# toolchain). Builds use `--isolation chroot` and the vfs storage driver
# (no overlayfs or cgroup controllers in the sandbox this was written in).
# There, `podman run` itself stopped at crun's `setrlimit RLIMIT_NPROC:
# Operation not permitted`, so the script runs the image's files with
# chroot as the image's user instead: the binary, its user, the CA
# bundle, and curl for the HEALTHCHECK.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${WORK:-/tmp/qbproxy-container-check}
podman=(podman --storage-driver vfs --cgroup-manager=cgroupfs)
mkdir -p "$work"

if ! "${podman[@]}" image exists localhost/rust:1-bookworm; then
    debootstrap --variant=minbase --include=ca-certificates,curl,gcc,libc6-dev \
        bookworm "$work/rootfs" http://deb.debian.org/debian
    # A TLS-intercepting egress needs its CA inside too.
    cp /usr/local/share/ca-certificates/*.crt "$work/rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
    cp /etc/ssl/certs/ca-certificates.crt "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
    tar -C "$work/rootfs" -c . | "${podman[@]}" import - localhost/debian:bookworm-slim
    mkdir -p "$work/rust"
    cp -a "$(rustc --print sysroot)" "$work/rust/toolchain"
    printf 'FROM localhost/debian:bookworm-slim\nCOPY toolchain /usr/local/rust\nENV PATH=/usr/local/rust/bin:$PATH CARGO_HOME=/usr/local/cargo\n' \
        > "$work/rust/Containerfile"
    "${podman[@]}" build --isolation chroot --network host -t localhost/rust:1-bookworm "$work/rust"
fi

# The build context as the Dockerfile sees it (.dockerignore applies).
rm -rf "$work/context" && mkdir -p "$work/context"
git archive HEAD | tar -x -C "$work/context"
"${podman[@]}" build --isolation chroot --pull=never --network host -t localhost/qbproxy:check "$work/context"

# The runtime stage's files, run as the image's user against the simulator.
"${podman[@]}" rm -f qbproxy-check >/dev/null 2>&1 || true
"${podman[@]}" create --name qbproxy-check localhost/qbproxy:check >/dev/null
rm -rf "$work/image" && mkdir -p "$work/image"
"${podman[@]}" export qbproxy-check | tar -x -C "$work/image"
cargo build --release --quiet --bin qbproxy
target/release/qbproxy sim --listen 127.0.0.1:19481 > "$work/sim.txt" & sim=$!
trap 'kill $sim $proxy 2>/dev/null' EXIT
sleep 1
field() { sed -n "s/^$1 = //p" "$work/sim.txt"; }
mkdir -p "$work/image/etc/qbproxy"
cat > "$work/image/etc/qbproxy/config.toml" <<TOML
[listen]
addr = "0.0.0.0:19480"
[admin]
addr = "0.0.0.0:19490"
[upstream]
url = "http://127.0.0.1:19481"
[quickblox]
application_id = $(field application_id)
auth_key = $(field auth_key)
auth_secret_file = "secret"
[[identity]]
name = "demo"
login = "demo"
password = "demo-password"
TOML
field auth_secret | tr -d '"' > "$work/image/etc/qbproxy/secret"
uid=$(awk -F: '$1 == "qbproxy" { print $3 }' "$work/image/etc/passwd")
chroot "$work/image" /usr/bin/setpriv --reuid="$uid" --regid=65534 --clear-groups \
    /usr/local/bin/qbproxy --config /etc/qbproxy/config.toml & proxy=$!
sleep 2
chroot "$work/image" curl -fsS http://127.0.0.1:19490/healthz
curl -fsS http://127.0.0.1:19490/readyz
curl -fsS 'http://127.0.0.1:19480/users.json?per_page=1' | head -c 80; echo
echo "container-check: ok"

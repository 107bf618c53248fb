#!/usr/bin/env bash
# Build the structenv sandbox image locally, with no container registry.
#
#   build.sh [--source DIR] [--tag structenv-sandbox:VERSION] [--cache-dir DIR] [--force]
#
# The recipe ships inside the package (structenv/_images/); `structenv image build` runs it.
# --source is the structenv source tree to install (a dir with pyproject.toml and src/):
# by default the checkout this script sits in; for an installed wheel, `structenv image build`
# stages one from the installed package.
# Layer 1 (cached): a `debootstrap --variant=minbase bookworm` rootfs with python3, bubblewrap
# and tmux, kept as a tarball under the cache dir and loaded with `docker import` as
# structenv-sandbox-base:<key>. Layer 2: the Dockerfile beside this script installs structenv and its runtime
# dependencies from wheels built here on the host (`pip wheel` may reach PyPI; the container
# build never touches the network). The final image is labelled with a hash of the sources, so
# a rerun with unchanged sources does nothing. Needs root (debootstrap), docker, python3 + pip.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source_dir="$(cd "$here/../../.." && pwd)"  # src/structenv/_images -> the checkout
python="${PYTHON:-python3}"
tag=""
cache="${STRUCTENV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/structenv}/images"
mirror="${STRUCTENV_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=bookworm
packages="python3,bubblewrap,tmux,git,python3-pytest,slirp4netns,iproute2,nftables"
force=0

while [ $# -gt 0 ]; do
    case "$1" in
        --source) source_dir="$(cd "$2" && pwd)"; shift 2 ;;
        --tag) tag="$2"; shift 2 ;;
        --cache-dir) cache="$2"; shift 2 ;;
        --mirror) mirror="$2"; shift 2 ;;
        --force) force=1; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

[ -f "$source_dir/pyproject.toml" ] && [ -d "$source_dir/src/structenv" ] || {
    echo "build.sh: $source_dir is not a structenv source tree (no pyproject.toml and src/structenv; pass --source)" >&2; exit 1; }
version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$source_dir/pyproject.toml" | head -1)"
[ -n "$tag" ] || tag="structenv-sandbox:${version}"

log() { echo "[image build $(date +%H:%M:%S)] $*" >&2; }
t0=$(date +%s)
docker version >/dev/null 2>&1 || {
    echo "build.sh: no Docker Engine answers (docker version failed)" >&2; exit 1; }
mkdir -p "$cache"

# What the final image is made of: the sources, the recipe and the base's package list.
source_hash="$(
    cd "$source_dir" &&
    { find src -type f \( -name '*.py' -o -name 'py.typed' \) -not -path '*/__pycache__/*' | LC_ALL=C sort
      echo pyproject.toml; } |
    xargs sha256sum | { cat; (cd "$here" && sha256sum Dockerfile build.sh); echo "$suite $packages"; } |
    sha256sum | cut -c1-16
)"
current="$(docker image inspect -f '{{index .Config.Labels "org.structenv.source-hash"}}' "$tag" 2>/dev/null || true)"
if [ "$force" = 0 ] && [ "$current" = "$source_hash" ]; then
    log "$tag is up to date (sources $source_hash)"
    echo "$tag"
    exit 0
fi

# -- layer 1: the base rootfs ------------------------------------------------------------
base_key="$(echo "$suite $packages minbase v1" | sha256sum | cut -c1-12)"
base_tag="structenv-sandbox-base:$base_key"
rootfs_tar="$cache/rootfs-$suite-$base_key.tar"
if [ "$force" = 1 ] || ! docker image inspect "$base_tag" >/dev/null 2>&1; then
    if [ "$force" = 1 ] || [ ! -s "$rootfs_tar" ]; then
        command -v debootstrap >/dev/null || {
            echo "build.sh: debootstrap is missing (apt-get install -y debootstrap)" >&2; exit 1; }
        work="$(mktemp -d /var/tmp/structenv-rootfs.XXXXXX)"
        trap 'rm -rf "$work"' EXIT
        log "debootstrap $suite ($packages) from $mirror (~40 s)"
        debootstrap --variant=minbase --include="$packages" "$suite" "$work/rootfs" "$mirror" \
            > "$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
        rm -rf "$work"/rootfs/var/cache/apt/*.bin "$work"/rootfs/var/lib/apt/lists/* \
            "$work"/rootfs/usr/share/doc/* "$work"/rootfs/usr/share/man/* \
            "$work"/rootfs/usr/share/locale/* "$work"/rootfs/var/log/*.log
        tar -C "$work/rootfs" --numeric-owner -cf "$rootfs_tar.part" .
        mv "$rootfs_tar.part" "$rootfs_tar"
        rm -rf "$work"; trap - EXIT
    fi
    log "docker import $rootfs_tar -> $base_tag"
    docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' "$rootfs_tar" "$base_tag" >/dev/null
fi

# -- layer 2: structenv from host-built wheels ---------------------------------------------
ctx="$(mktemp -d /var/tmp/structenv-image.XXXXXX)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/wheels" "$ctx/pip"
deps_key="$(sha256sum "$source_dir/pyproject.toml" | cut -c1-12)"
deps_dir="$cache/wheels-deps-$deps_key"
if [ ! -f "$deps_dir/.complete" ]; then
    log "building dependency wheels into $deps_dir"
    rm -rf "$deps_dir"; mkdir -p "$deps_dir"
    "$python" -m pip wheel -q --disable-pip-version-check --wheel-dir "$deps_dir" "$source_dir"
    rm -f "$deps_dir"/structenv-*.whl
    "$python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$deps_dir/pip" pip
    touch "$deps_dir/.complete"
fi
log "building the structenv wheel"
"$python" -m pip wheel -q --disable-pip-version-check --no-deps --wheel-dir "$ctx/wheels" "$source_dir"
cp "$deps_dir"/*.whl "$ctx/wheels/"
cp "$deps_dir"/pip/pip-*.whl "$ctx/pip/pip.whl"
cp "$here/Dockerfile" "$ctx/Dockerfile"
log "docker build $tag"
DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE=$base_tag" \
    --build-arg "SOURCE_HASH=$source_hash" -t "$tag" "$ctx" >/dev/null 2>"$ctx/build.err" || {
    cat "$ctx/build.err" >&2; exit 1; }
# The previous build of this tag is now dangling: drop it (never one a container still uses).
docker image prune -f --filter "label=org.structenv.image=sandbox" >/dev/null 2>&1 || true
log "built $tag in $(( $(date +%s) - t0 ))s"
echo "$tag"

#!/bin/bash
# Install everything uctr-batch and its test suite need on Debian 12. Run as root.
# Idempotent: packages, the venv and the test user are only touched when something is missing.
# Quiet on success; on failure it says what failed and shows the failing command's output.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UCTR_VENV:-/opt/uctr-batch/venv}"
BIN_DIR="${UCTR_BIN_DIR:-/usr/local/bin}"  # where `uctr` and `uctr-exec` are linked for every user
TEST_USER="uctrtest"
LOG="$(mktemp /tmp/uctr-install.XXXXXX.log)"
trap 'rm -f "$LOG"' EXIT

PACKAGES=(
    # registry, image tools and the correctness oracle
    docker-registry skopeo umoci mmdebstrap apache2-utils openssl zstd ca-certificates curl
    # run modes and peers
    proot crun runc fakechroot busybox-static bubblewrap charliecloud-runtime uidmap
    # python
    python3-venv python3-dev
    # batch systems and MPI
    slurmctld slurmd slurm-client munge libslurm-dev libpmix-dev libpmix-bin
    openmpi-bin libopenmpi-dev mpich libmpich-dev python3-mpi4py
    # build and inspection tools
    gcc make patchelf binutils file hyperfine util-linux mount procps psmisc iproute2
    # the file-system-call counts of the C join (tests/unit/test_fastrec.py, bench_fastpath)
    strace
    # squashfs images (enroot format, --container-save): unsquashfs/mksquashfs, sqfs2tar
    squashfs-tools squashfs-tools-ng squashfuse
    # bench/bench_scale.py's plots
    python3-matplotlib
)

fail() {
    echo "install.sh: $1" >&2
    [ -s "$LOG" ] && tail -n 40 "$LOG" >&2
    exit 1
}

quietly() {  # run "$@" with its output kept in $LOG, shown only if it fails
    "$@" >"$LOG" 2>&1
}

[ "$(id -u)" -eq 0 ] || fail "run as root (for example: su -c $0)"

missing_packages() {
    local pkg status
    for pkg in "${PACKAGES[@]}"; do
        status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
        [ "$status" = "install ok installed" ] || echo "$pkg"
    done
}

apt_retry() {  # apt-get with retries while another apt/dpkg holds the lock
    local attempt
    for attempt in $(seq 1 30); do
        if quietly apt-get -o DPkg::Lock::Timeout=60 "$@"; then
            return 0
        fi
        grep -qiE "could not get lock|unable to acquire|temporary failure" "$LOG" || return 1
        sleep 5
    done
    return 1
}

install_packages() {
    local missing
    missing="$(missing_packages)"
    [ -z "$missing" ] && return 0
    export DEBIAN_FRONTEND=noninteractive
    apt_retry update || fail "apt-get update failed"
    # shellcheck disable=SC2086  # one word per package
    apt_retry install -y --no-install-recommends $missing \
        || fail "apt-get install failed for: $(echo $missing)"
}

requirements() {  # runtime deps + the test and fast extras, read from pyproject.toml
    # and what building the package needs (setuptools' bdist_wheel needs wheel), so that
    # install_package builds it later without an index (a test root without network)
    /usr/bin/python3 - "$REPO/pyproject.toml" <<'PY'
import sys, tomllib
pyproject = tomllib.load(open(sys.argv[1], "rb"))
project = pyproject["project"]
extras = project.get("optional-dependencies", {})
for requirement in project["dependencies"] + extras.get("test", []) + extras.get("fast", []):
    print(requirement)
for requirement in pyproject["build-system"]["requires"] + ["wheel"]:
    print(requirement)
PY
}

install_venv() {
    # The requirements only; install_package installs the project itself. Tests import the
    # working tree (pytest pythonpath), so what is tested is always what is checked out.
    local wanted stamp="$VENV/.uctr-requirements"
    wanted="$(requirements)" || fail "cannot read $REPO/pyproject.toml"
    if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
        return 0
    fi
    [ -x "$VENV/bin/python" ] || quietly /usr/bin/python3 -m venv "$VENV" \
        || fail "cannot create the virtual environment $VENV"
    # shellcheck disable=SC2086
    quietly "$VENV/bin/pip" install --disable-pip-version-check --no-input $wanted \
        || fail "pip install failed in $VENV"
    printf '%s\n' "$wanted" >"$stamp"
}

ensure_test_user() {
    if ! id "$TEST_USER" >/dev/null 2>&1; then
        quietly useradd --create-home --shell /bin/bash "$TEST_USER" \
            || fail "cannot create the test user $TEST_USER"
    fi
    # Rootless runtimes (runc, crun, newuidmap) need subordinate id ranges.
    grep -q "^$TEST_USER:" /etc/subuid 2>/dev/null \
        || quietly usermod --add-subuids 100000-165535 "$TEST_USER" || fail "usermod --add-subuids"
    grep -q "^$TEST_USER:" /etc/subgid 2>/dev/null \
        || quietly usermod --add-subgids 100000-165535 "$TEST_USER" || fail "usermod --add-subgids"
}

package_sources_hash() {  # what an installed package was built from
    (cd "$REPO" && find pyproject.toml README.md uctr_batch -type f ! -name '*.pyc' \
        ! -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum
}

install_package() {
    # A real (not editable) install of this checkout into the venv: `uctr` and `uctr-exec`
    # then run for every user without reading the checkout, which may sit in /root or move.
    # Built from a copy, so the checkout gets no build/ or *.egg-info.
    local wanted build stamp="$VENV/.uctr-package"
    # this script copied alone (to set up a test root) installs the requirements only
    [ -d "$REPO/uctr_batch" ] || return 0
    wanted="$(package_sources_hash)" || fail "cannot read the sources in $REPO"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && [ -x "$VENV/bin/uctr" ] \
        && [ -x "$VENV/bin/uctr-exec" ]; then
        return 0
    fi
    build="$(mktemp -d /tmp/uctr-package.XXXXXX)"
    tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' -cf - pyproject.toml README.md \
        uctr_batch | tar -C "$build" -xf - || { rm -rf "$build"; fail "cannot copy $REPO"; }
    if ! quietly "$VENV/bin/pip" install --disable-pip-version-check --no-input --no-deps \
        --no-build-isolation --force-reinstall "$build"; then
        rm -rf "$build"
        fail "pip install of the uctr-batch package failed in $VENV"
    fi
    rm -rf "$build"
    chmod -R a+rX "$VENV"  # every user runs these commands, whatever root's umask was
    printf '%s\n' "$wanted" >"$stamp"
}

link_commands() {  # BIN_DIR/uctr -> VENV/bin/uctr, the same for uctr-exec
    local name link
    [ -x "$VENV/bin/uctr" ] || return 0  # no package installed (see install_package)
    mkdir -p "$BIN_DIR"
    for name in uctr uctr-exec; do
        link="$BIN_DIR/$name"
        [ "$(readlink "$link" 2>/dev/null)" = "$VENV/bin/$name" ] && continue
        if [ -e "$link" ] && [ ! -L "$link" ]; then
            fail "$link exists and is not a link; remove it, then run this again"
        fi
        ln -sfn "$VENV/bin/$name" "$link" || fail "cannot link $link"
    done
}

install_packages
install_venv
install_package
link_commands
ensure_test_user

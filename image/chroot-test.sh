#!/bin/bash
# chroot-test.sh [--plain] WORKDIR [BOOT_FILES_DIR]
#
# What can be tested of the appliance image without a Raspberry Pi: builds the storelink wheel and a wheelhouse
# of its pinned dependencies, makes a minimal Debian root with debootstrap (the same release Raspberry Pi OS is
# built on), installs StoreLink into it with install-into-root.sh (the very script the pi-gen stage runs),
# and, when BOOT_FILES_DIR is given, puts those files on the "boot partition" and runs the first-boot
# provisioning inside the root with chroot. The root is left in WORKDIR/root for the caller to inspect
# (tests/test_image_chroot.py checks files, owners and modes). Needs root, debootstrap and network access to
# a Debian mirror and PyPI (or their caches).
#
# --plain: a store on plain Debian instead (scripts/install.sh --root, with its default extras): no provisioning.
#
# STORELINK_TEST_WHEELHOUSE=DIR: use that wheelhouse (with requirements.lock) instead of building one.
#
# The debootstrapped base is cached as a tarball in $STORELINK_TEST_CACHE (default /var/cache/storelink-test)
# keyed by release and package list, so reruns take seconds; without the cache it takes about a minute.
set -euo pipefail

PLAIN=no
if [[ ${1:-} == --plain ]]; then PLAIN=yes; shift; fi
EXTRAS=all   # the appliance carries every driver's extra
[[ $PLAIN == yes ]] && EXTRAS=scanners,gpio,escpos   # scripts/install.sh's default
WORK=$(realpath "$1")
BOOT_FILES=${2:+$(realpath "$2")}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
RELEASE=${STORELINK_TEST_RELEASE:-bookworm}
MIRROR=${STORELINK_TEST_MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,systemd
CACHE=${STORELINK_TEST_CACHE:-/var/cache/storelink-test}

[[ $(id -u) == 0 ]] || { echo "chroot-test.sh needs root (debootstrap, chroot, chown)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "debootstrap is missing (scripts/apt-packages.txt)" >&2; exit 1; }
mkdir -p "$WORK"
step() { printf '== %s (%ds)\n' "$*" "$SECONDS"; }

rm -rf "$WORK/wheelhouse"
if [[ -n ${STORELINK_TEST_WHEELHOUSE:-} ]]; then
    step "wheelhouse (built already: $STORELINK_TEST_WHEELHOUSE)"   # the tests build one [all] for both runs
    cp -r "$STORELINK_TEST_WHEELHOUSE" "$WORK/wheelhouse"
else
    step "wheelhouse"
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$WORK/wheelhouse" \
        -c "$HERE/requirements.lock" "${REPO}[$EXTRAS]"
    cp "$HERE/requirements.lock" "$WORK/wheelhouse/"
fi

step "base root filesystem ($RELEASE, minbase + $PACKAGES)"
arch=$(dpkg --print-architecture)
key=$(printf '%s\n' "$RELEASE" "$arch" "$PACKAGES" "$MIRROR" | sha256sum | cut -c1-12)
tarball=$CACHE/$RELEASE-$arch-minbase-$key.tar
# A run killed half-way may have left /proc mounted in the old root: never rm -rf through it.
if mountpoint -q "$WORK/root/proc"; then umount -l "$WORK/root/proc"; fi
rm -rf --one-file-system "$WORK/root"
mkdir -p "$WORK/root"
if [[ -s $tarball ]]; then
    tar -C "$WORK/root" -xpf "$tarball"
else
    debootstrap --variant=minbase --include="$PACKAGES" "$RELEASE" "$WORK/root" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -30 "$WORK/debootstrap.log" >&2; exit 1; }
    rm -rf "$WORK/root/var/cache/apt/archives/"*.deb "$WORK/root/var/lib/apt/lists/"*_Packages
    if mkdir -p "$CACHE" 2>/dev/null; then
        tar -C "$WORK/root" -cpf "$tarball.tmp.$$" . && mv "$tarball.tmp.$$" "$tarball"
    fi
fi

host_py=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
root_py=$(chroot "$WORK/root" /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ $host_py != "$root_py" ]]; then
    echo "the wheelhouse was built with Python $host_py but $RELEASE has $root_py" >&2
    exit 1
fi

if [[ $PLAIN == yes ]]; then
    step "scripts/install.sh (plain Debian)"
    bash "$REPO/scripts/install.sh" --root "$WORK/root" --wheelhouse "$WORK/wheelhouse"
    step "done"
    exit 0
fi

step "install-into-root.sh"
"$HERE/install-into-root.sh" "$WORK/root" "$WORK/wheelhouse"

if [[ -n $BOOT_FILES ]]; then
    step "first-boot provisioning"
    rm -rf "$WORK/root/boot/firmware/storelink"
    mkdir -p "$WORK/root/boot/firmware"
    cp -r "$BOOT_FILES" "$WORK/root/boot/firmware/storelink"
    # No repartitioning and no overlay in a chroot (the script refuses anyway; this says so explicitly).
    mount -t proc proc "$WORK/root/proc"
    status=0
    chroot "$WORK/root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
        STORELINK_DATA_PARTITION=off STORELINK_OVERLAY=off /opt/storelink/bin/storelink-provision || status=$?
    umount "$WORK/root/proc" || umount -l "$WORK/root/proc"
    if [[ $status != 0 ]]; then
        echo "provisioning failed with status $status" >&2
        exit "$status"
    fi
fi

step "storelink inside the root"
chroot "$WORK/root" /usr/bin/env -i /opt/storelink/current/bin/storelink --version
if [[ -e $WORK/root/etc/storelink/storelink.toml ]]; then
    chroot "$WORK/root" /usr/bin/env -i PATH=/usr/bin:/bin setpriv --reuid=storelink --regid=storelink --init-groups -- \
        /opt/storelink/current/bin/storelink check-config /etc/storelink/storelink.toml
fi
step "done"

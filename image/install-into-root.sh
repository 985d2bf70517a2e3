#!/bin/bash
# install-into-root.sh [--plain] [--extras LIST] ROOT WHEELHOUSE
#
# Installs StoreLink into a Debian root filesystem exactly as the appliance image has it. Used by the pi-gen
# stage (image/stage-storelink/01-run.sh) and by the chroot test (image/chroot-test.sh), so that what CI checks
# is what ships. Runs on the build host as root; commands that must run inside ROOT go through chroot (under
# pi-gen that is an arm64 root run through qemu-user's binfmt handler).
#
# --plain: a store on plain Debian / Raspberry Pi OS, no appliance image (scripts/install.sh): the same venv,
# units, user, directories and udev rules, but none of the image's own machinery (first-boot provisioning, the
# data partition in fstab, the hardware watchdog, SSH off, the image marker), and the gateway is not enabled
# until its config is written. --extras: the drivers' extras to install (default all; the image has all).
#
# ROOT must already have python3, python3-venv and systemd. WHEELHOUSE holds the storelink wheel and a wheel
# for every dependency, for ROOT's architecture and Python (pip installs with --no-index: the image build
# decides what goes in, not whatever PyPI serves that day).
set -euo pipefail

PLAIN=no
EXTRAS=all
while [[ ${1:-} == --* ]]; do
    case $1 in
        --plain) PLAIN=yes; shift ;;
        --extras) EXTRAS=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
ROOT=$(realpath "$1")
WHEELHOUSE=$(realpath "$2")
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
PREFIX=/opt/storelink

[[ -x $ROOT/usr/bin/python3 ]] || { echo "no python3 in $ROOT" >&2; exit 1; }

# Commands inside ROOT get a clean environment (the build host's PIP_*/PYTHON* settings are not the image's)
# and a /proc (systemd-tmpfiles and pip want one; pi-gen's on_chroot mounts it the same way).
in_root() {
    chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"
}
mounted_proc=no
if ! mountpoint -q "$ROOT/proc"; then
    mount -t proc proc "$ROOT/proc"
    mounted_proc=yes
fi
cleanup() {
    if [[ $mounted_proc == yes ]]; then umount "$ROOT/proc" || umount -l "$ROOT/proc"; fi
}
trap cleanup EXIT
wheel=$(find "$WHEELHOUSE" -maxdepth 1 -name 'storelink-*.whl' | sort | tail -1)
[[ -n $wheel ]] || { echo "no storelink wheel in $WHEELHOUSE" >&2; exit 1; }

# 1. The gateway in its own venv: upgrades replace the venv, never touch the system Python.
staging=$ROOT/tmp/storelink-wheelhouse
rm -rf "$staging" && mkdir -p "$staging"
cp "$WHEELHOUSE"/*.whl "$staging"/
[[ -e $WHEELHOUSE/requirements.lock ]] && cp "$WHEELHOUSE/requirements.lock" "$staging"/
in_root /usr/bin/python3 -m venv "$PREFIX/venv"
constraints=()
[[ -e $staging/requirements.lock ]] && constraints=(-c /tmp/storelink-wheelhouse/requirements.lock)
in_root "$PREFIX/venv/bin/pip" install --quiet --no-index --no-cache-dir --disable-pip-version-check \
    --find-links /tmp/storelink-wheelhouse "${constraints[@]}" "/tmp/storelink-wheelhouse/$(basename "$wheel")[$EXTRAS]"
rm -rf "$staging"
# Bytecode now, while the root is writable (at run time it is read-only and PYTHONDONTWRITEBYTECODE is set).
in_root "$PREFIX/venv/bin/python" -m compileall -q "$PREFIX/venv/lib" >/dev/null || true

# 2. Units, users, directories, device rules; `storelink` on the PATH for check-config and the hq tools.
install -D -m 0644 -t "$ROOT/usr/lib/systemd/system" \
    "$REPO"/systemd/storelink.service "$REPO"/systemd/storelink-recover.service "$REPO"/systemd/storelink-recover.timer
install -D -m 0644 "$REPO/systemd/storelink.sysusers" "$ROOT/usr/lib/sysusers.d/storelink.conf"
install -D -m 0644 "$REPO/systemd/storelink.tmpfiles" "$ROOT/usr/lib/tmpfiles.d/storelink.conf"
install -D -m 0644 "$REPO/systemd/99-storelink.rules" "$ROOT/usr/lib/udev/rules.d/99-storelink.rules"
install -D -m 0644 "$REPO/docs/appliance.md" "$ROOT$PREFIX/share/doc/appliance.md"
install -D -m 0644 "$REPO/docs/storelink.example.toml" "$ROOT$PREFIX/share/doc/storelink.example.toml"
install -d "$ROOT/usr/local/bin"
ln -sfn "$PREFIX/venv/bin/storelink" "$ROOT/usr/local/bin/storelink"
in_root systemd-sysusers
in_root systemd-tmpfiles --create --prefix=/etc/storelink --prefix=/var/lib/storelink
if [[ $PLAIN == yes ]]; then
    version=$(in_root "$PREFIX/venv/bin/storelink" --version)
    echo "installed $version into $ROOT (plain Debian: not enabled until its config is written)"
    exit 0
fi

# --- the appliance image only from here ---
# The hardware watchdog and first-boot provisioning.
install -D -m 0644 "$REPO/systemd/storelink-provision.service" "$ROOT/usr/lib/systemd/system/storelink-provision.service"
install -D -m 0644 "$REPO/systemd/storelink-watchdog.conf" \
    "$ROOT/etc/systemd/system.conf.d/storelink-watchdog.conf"
install -D -m 0755 "$REPO/image/provision/storelink-provision" "$ROOT$PREFIX/bin/storelink-provision"

# 3. The database lives on its own partition (made on first boot from the card's free space), never on the
#    read-only root. nofail + x-systemd.after: on first boot the partition appears only once provisioning
#    has made it; the gateway itself requires the mount (drop-in below), so it never buffers into RAM.
if ! grep -q 'LABEL=storelink-data' "$ROOT/etc/fstab" 2>/dev/null; then
    echo 'LABEL=storelink-data /var/lib/storelink ext4 noatime,commit=5,nofail,x-systemd.after=storelink-provision.service,x-systemd.device-timeout=5min 0 2' \
        >>"$ROOT/etc/fstab"
fi
install -d -m 0755 "$ROOT/etc/systemd/system/storelink.service.d"
cat >"$ROOT/etc/systemd/system/storelink.service.d/data-partition.conf" <<'EOF'
# The outbox must be on the persistent data partition: without it, refuse to run rather than accept events
# into a RAM-backed overlay that a power cut would erase.
[Unit]
RequiresMountsFor=/var/lib/storelink
EOF

# 4. Enabled at boot; SSH off unless the installer turns it on; time sync on (prices have effective_at).
in_root systemctl enable storelink.service storelink-provision.service >/dev/null 2>&1
if [[ -e $ROOT/usr/lib/systemd/system/systemd-timesyncd.service || -e $ROOT/lib/systemd/system/systemd-timesyncd.service ]]; then
    in_root systemctl enable systemd-timesyncd.service >/dev/null 2>&1
fi
for unit in ssh.service sshswitch.service; do
    if [[ -e $ROOT/usr/lib/systemd/system/$unit || -e $ROOT/lib/systemd/system/$unit ]]; then
        in_root systemctl disable "$unit" >/dev/null 2>&1 || true
    fi
done

# 5. Marks the root as a StoreLink image (storelink-provision repartitions only such a system).
version=$(in_root "$PREFIX/venv/bin/storelink" --version)
printf 'STORELINK_VERSION=%s\nBUILT=%s\n' "${version#storelink }" "${SOURCE_DATE_EPOCH:-$(date -u +%s)}" \
    >"$ROOT/etc/storelink-image"
echo "installed $version into $ROOT"

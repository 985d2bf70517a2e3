#!/bin/bash
# install-into-root.sh [--plain] [--extras LIST] ROOT WHEELHOUSE
#
# Installs StoreLink into a Debian root filesystem exactly as the appliance image has it. Used by the pi-gen
# stage (image/stage-storelink/01-run.sh) and by the chroot test (image/chroot-test.sh), so that what CI checks
# is what ships. Runs on the build host as root; commands that must run inside ROOT go through chroot (under
# pi-gen that is an arm64 root run through qemu-user's binfmt handler).
#
# --plain: a store on plain Debian / Raspberry Pi OS, no appliance image (scripts/install.sh): the same release
# venv, units (application updates included), user, directories and udev rules, but none of the image's own
# machinery (first-boot provisioning, the data partition in fstab, RAUC and its slot marking, the hardware
# watchdog, SSH off, the image marker), and nothing is enabled until the store's config is written.
# --extras: the drivers' extras to install (default all; the image has all).
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

# 1. The gateway in its own versioned venv, /opt/storelink/releases/<version>, made current through the
#    releases/current symlink that application updates switch (gateway/update/releases.py); the units run
#    /opt/storelink/current, a fixed link to releases/current. Upgrades add a venv, never touch the system Python.
version=$(basename "$wheel" | cut -d- -f2)
release=$PREFIX/releases/$version
staging=$ROOT/tmp/storelink-wheelhouse
rm -rf "$staging" && mkdir -p "$staging"
cp "$WHEELHOUSE"/*.whl "$staging"/
[[ -e $WHEELHOUSE/requirements.lock ]] && cp "$WHEELHOUSE/requirements.lock" "$staging"/
rm -rf "$ROOT$release"
in_root /usr/bin/python3 -m venv "$release"
constraints=()
[[ -e $staging/requirements.lock ]] && constraints=(-c /tmp/storelink-wheelhouse/requirements.lock)
in_root "$release/bin/pip" install --quiet --no-index --no-cache-dir --disable-pip-version-check \
    --find-links /tmp/storelink-wheelhouse "${constraints[@]}" "/tmp/storelink-wheelhouse/$(basename "$wheel")[$EXTRAS]"
rm -rf "$staging"
# Bytecode now, while the root is writable (at run time it is read-only and PYTHONDONTWRITEBYTECODE is set).
in_root "$release/bin/python" -m compileall -q "$release/lib" >/dev/null || true
# The marker the updater reads: this release is complete, and the data schemas it writes (a rollback to it
# is checked against them).
in_root "$release/bin/python" -c 'import json, sys, time
from storelink.system.schema import schemas_as_dict
print(json.dumps({"version": sys.argv[1], "manifest_sha256": "image", "installed_at": time.time(),
                  "requirement": f"storelink[{sys.argv[2]}]==" + sys.argv[1], "schemas": schemas_as_dict()}, indent=1))' \
    "$version" "$EXTRAS" >"$ROOT$release/.storelink-release.json"
ln -sfn "$version" "$ROOT$PREFIX/releases/current"
ln -sfn releases/current "$ROOT$PREFIX/current"

# 2. Units (the gateway, its recovery, application updates), users, directories, device rules; `storelink` on the
#    PATH for check-config and the hq tools.
install -D -m 0644 -t "$ROOT/usr/lib/systemd/system" \
    "$REPO"/systemd/storelink.service "$REPO"/systemd/storelink-recover.service \
    "$REPO"/systemd/storelink-recover.timer "$REPO"/systemd/storelink-update.path "$REPO"/systemd/storelink-update.service
install -D -m 0644 "$REPO/systemd/storelink.sysusers" "$ROOT/usr/lib/sysusers.d/storelink.conf"
install -D -m 0644 "$REPO/systemd/storelink.tmpfiles" "$ROOT/usr/lib/tmpfiles.d/storelink.conf"
install -D -m 0644 "$REPO/systemd/99-storelink.rules" "$ROOT/usr/lib/udev/rules.d/99-storelink.rules"
install -D -m 0644 "$REPO/docs/appliance.md" "$ROOT$PREFIX/share/doc/appliance.md"
install -D -m 0644 "$REPO/docs/operations.md" "$ROOT$PREFIX/share/doc/operations.md"
install -D -m 0644 "$REPO/docs/storelink.example.toml" "$ROOT$PREFIX/share/doc/storelink.example.toml"
install -d "$ROOT/usr/local/bin"
ln -sfn "$PREFIX/current/bin/storelink" "$ROOT/usr/local/bin/storelink"
in_root systemd-sysusers
in_root systemd-tmpfiles --create --prefix=/etc/storelink --prefix=/var/lib/storelink
if [[ $PLAIN == yes ]]; then
    echo "installed $(in_root "$PREFIX/current/bin/storelink" --version) into $ROOT (plain Debian: nothing enabled" \
         "until its config is written)"
    exit 0
fi

# --- the appliance image only from here ---
# First-boot provisioning, the hardware watchdog, RAUC's slot marking.
install -D -m 0644 -t "$ROOT/usr/lib/systemd/system" \
    "$REPO"/systemd/storelink-provision.service "$REPO"/systemd/storelink-mark-good.service
install -D -m 0644 "$REPO/systemd/storelink-watchdog.conf" \
    "$ROOT/etc/systemd/system.conf.d/storelink-watchdog.conf"
install -D -m 0755 "$REPO/image/provision/storelink-provision" "$ROOT$PREFIX/bin/storelink-provision"
# RAUC (OS updates, image/rauc/): the system config always; the keyring when the build provides one (the
# retailer's OS-signing CA; without it RAUC refuses every bundle, which is the safe default).
install -D -m 0644 "$REPO/image/rauc/system.conf" "$ROOT/etc/rauc/system.conf"
if [[ -n ${RAUC_KEYRING:-} ]]; then
    install -D -m 0644 "$RAUC_KEYRING" "$ROOT/etc/rauc/keyring.pem"
fi

# 3. The data partition (made on first boot from the card's free space, after RAUC's second root slot) is
#    mounted on /data and holds everything that must survive a reboot and an OS update: the gateway's state,
#    bind-mounted on /var/lib/storelink, and the application releases, bind-mounted on /opt/storelink/releases
#    (provisioning seeds it with this image's release). nofail + x-systemd.after: on first boot the partition
#    appears only once provisioning has made it; the gateway itself requires the mount (drop-in below), so it
#    never buffers into RAM.
if ! grep -q 'LABEL=storelink-data' "$ROOT/etc/fstab" 2>/dev/null; then
    cat >>"$ROOT/etc/fstab" <<'FSTAB'
LABEL=storelink-data /data ext4 noatime,commit=5,nofail,x-systemd.after=storelink-provision.service,x-systemd.device-timeout=5min 0 2
/data/storelink /var/lib/storelink none bind,nofail,x-systemd.requires-mounts-for=/data 0 0
/data/releases /opt/storelink/releases none bind,nofail,x-systemd.requires-mounts-for=/data 0 0
FSTAB
fi
install -d -m 0755 "$ROOT/data"
install -d -m 0755 "$ROOT/etc/systemd/system/storelink.service.d"
cat >"$ROOT/etc/systemd/system/storelink.service.d/data-partition.conf" <<'EOF'
# The outbox must be on the persistent data partition: without it, refuse to run rather than accept events
# into a RAM-backed overlay that a power cut would erase.
[Unit]
RequiresMountsFor=/var/lib/storelink
EOF

# 4. Enabled at boot; SSH off unless the installer turns it on; time sync on (prices have effective_at).
in_root systemctl enable storelink.service storelink-provision.service storelink-update.path \
    storelink-mark-good.service >/dev/null 2>&1
if [[ -e $ROOT/usr/lib/systemd/system/systemd-timesyncd.service || -e $ROOT/lib/systemd/system/systemd-timesyncd.service ]]; then
    in_root systemctl enable systemd-timesyncd.service >/dev/null 2>&1
fi
for unit in ssh.service sshswitch.service; do
    if [[ -e $ROOT/usr/lib/systemd/system/$unit || -e $ROOT/lib/systemd/system/$unit ]]; then
        in_root systemctl disable "$unit" >/dev/null 2>&1 || true
    fi
done

# 5. Marks the root as a StoreLink image (storelink-provision repartitions only such a system).
version=$(in_root "$PREFIX/current/bin/storelink" --version)
printf 'STORELINK_VERSION=%s\nBUILT=%s\n' "${version#storelink }" "${SOURCE_DATE_EPOCH:-$(date -u +%s)}" \
    >"$ROOT/etc/storelink-image"
echo "installed $version into $ROOT"

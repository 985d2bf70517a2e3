#!/usr/bin/env bash
# install.sh [--extras LIST] [--root DIR --wheelhouse DIR]: StoreLink for one store on plain Debian or Raspberry
# Pi OS (no appliance image), from this checkout, as root:
#
#     sudo bash scripts/install.sh                      # tills, POS files, serial scanners, GPIO mat, printers
#     sudo bash scripts/install.sh --extras all         # also keyboard-wedge (HID) scanners: builds evdev
#
# It installs what the appliance image has (image/install-into-root.sh --plain does the work, the same steps the
# image runs): the gateway in its own release venv /opt/storelink/current, `storelink` on the PATH, the units, the
# udev rules, the `storelink` user in its device groups, /etc/storelink and /var/lib/storelink. A first
# /etc/storelink/storelink.toml is the annotated example (docs/storelink.example.toml), never over an existing
# one. It ends with `storelink check-config` run as the gateway's user and says what to do next (it fails the
# install only for a config the store already had: the example lists devices a store may not have). Run it again to
# upgrade: the checkout's version becomes the current release, the config and the outbox are kept.
#
# --extras: the drivers' extras (pyproject.toml): scanners, gpio, escpos, hid, all (default scanners,gpio,escpos:
# hid needs a C compiler for evdev, installed only when asked for). --root/--wheelhouse: install into another root
# filesystem from a ready wheelhouse (the tests, an offline install); nothing is fetched then.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
EXTRAS=scanners,gpio,escpos
ROOT=/
WHEELHOUSE=
while (($#)); do
    case $1 in
        --extras) EXTRAS=$2; shift 2 ;;
        --root) ROOT=$2; shift 2 ;;
        --wheelhouse) WHEELHOUSE=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ $(id -u) == 0 ]] || { echo "install.sh: run it as root (sudo bash scripts/install.sh)" >&2; exit 1; }
ROOT=$(realpath "$ROOT")
[[ $EXTRAS =~ ^[a-z,]+$ ]] || { echo "install.sh: --extras takes names like scanners,gpio" >&2; exit 2; }
step() { printf '== %s\n' "$*"; }

if [[ -z $WHEELHOUSE ]]; then
    [[ $ROOT == / ]] || { echo "install.sh: --root needs --wheelhouse (wheels for that root's Python)" >&2; exit 2; }
    needs=(python3-venv systemd udev)
    [[ ,$EXTRAS, == *,hid,* || ,$EXTRAS, == *,all,* ]] && needs+=(gcc python3-dev linux-libc-dev)  # evdev
    bash scripts/apt-install.sh "${needs[@]}"
    step "wheels for storelink[$EXTRAS] (versions pinned by image/requirements.lock)"
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    python3 -m venv "$build/venv"
    "$build/venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
    "$build/venv/bin/pip" wheel --quiet --disable-pip-version-check --wheel-dir "$build/wheels" \
        -c image/requirements.lock "${REPO}[$EXTRAS]"
    cp image/requirements.lock "$build/wheels/"
    WHEELHOUSE=$build/wheels
fi

step "install into $ROOT"
bash image/install-into-root.sh --plain --extras "$EXTRAS" "$ROOT" "$WHEELHOUSE"

in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
config=/etc/storelink/storelink.toml
if [[ ! -e $ROOT$config ]]; then
    install -m 0640 -o root -g "$(in_root id -g storelink)" "$REPO/docs/storelink.example.toml" "$ROOT$config"
    fresh_config=yes
else
    fresh_config=no
fi
if [[ $ROOT == / && -d /run/systemd/system ]]; then  # a running system: load the new units and rules
    systemctl daemon-reload
    udevadm control --reload-rules 2>/dev/null && udevadm trigger --subsystem-match=tty --subsystem-match=input \
        --subsystem-match=usbmisc --subsystem-match=usb --subsystem-match=gpio 2>/dev/null || true
fi

step "storelink check-config $config (as the storelink user)"
check=0
in_root setpriv --reuid=storelink --regid=storelink --init-groups -- \
    /opt/storelink/current/bin/storelink check-config "$config" || check=$?
echo
if [[ $fresh_config == yes ]]; then
    echo "$config is the annotated example: set this store's id, broker, keys and devices in it."
    if ((check)); then  # the example has one device of every kind: some need extras this install left out
        echo "(check-config lists what the example asks for that this install does not have: delete those devices"
        echo " or install their extras with --extras; the install itself is complete.)"
        check=0
    fi
fi
cat <<EOF
Next:
  1. edit $config (every key: docs/config.md, devices: docs/drivers.md)
  2. storelink check-config $config
  3. systemctl enable --now storelink     (then: systemctl status storelink, journalctl -u storelink)
  4. systemctl enable --now storelink-update.path   (only if head office sends software updates: docs/operations.md)
The status page is at the [http] listen address of the config.
EOF
exit "$check"

#!/usr/bin/env bash
# apt-install.sh PACKAGE...: installs those of the Debian packages that are missing (as root, or with sudo), so
# the README's commands set a fresh Debian / Raspberry Pi OS machine up by themselves. Used by test.sh and demo.sh.
set -euo pipefail
missing=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
((${#missing[@]})) || exit 0
echo "installing Debian packages: ${missing[*]}"
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "need root to install ${missing[*]}: run this as root, or install sudo" >&2; exit 1; }
    SUDO=(sudo)
fi
# (env inside sudo: sudo resets the environment, so DEBIAN_FRONTEND in front of it would not reach apt-get)
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

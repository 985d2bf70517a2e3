#!/bin/bash
# build-bundle.sh ROOTFS_IMAGE OUT.raucb: a signed RAUC bundle (verity format) of one root filesystem image.
#
#   RAUC_CERT=signing.pem RAUC_KEY=signing.key RAUC_KEYRING=ca.pem VERSION=2026.12.1 \
#       image/rauc/build-bundle.sh rootfs.ext4 out/storelink-os-2026.12.1.raucb
#
# ROOTFS_IMAGE is an ext4 image of the appliance's root partition (image/build.sh cuts it out of the SD card
# image). The bundle is checked against RAUC_KEYRING right after it is made (`rauc info`, then `rauc extract`,
# which also verifies the payload), so a bundle that would be refused in the field is never shipped.
set -euo pipefail
IMAGE=$(realpath "${1:?usage: build-bundle.sh ROOTFS_IMAGE OUT.raucb}")
OUT=$(realpath -m "${2:?usage: build-bundle.sh ROOTFS_IMAGE OUT.raucb}")
: "${RAUC_CERT:?set RAUC_CERT (signing certificate)}" "${RAUC_KEY:?set RAUC_KEY (signing key)}"
: "${RAUC_KEYRING:?set RAUC_KEYRING (the CA the appliances trust)}" "${VERSION:?set VERSION}"
COMPATIBLE=${COMPATIBLE:-storelink-rpi-arm64}
command -v rauc >/dev/null || { echo "rauc is missing (apt-get install rauc squashfs-tools)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/content"
case $IMAGE in
    *.ext4) name=rootfs.ext4 ;;
    *) name=rootfs.img ;;
esac
cp "$IMAGE" "$work/content/$name"
cat >"$work/content/manifest.raucm" <<MANIFEST
[update]
compatible=$COMPATIBLE
version=$VERSION
description=StoreLink appliance OS $VERSION
build=${SOURCE_DATE_EPOCH:-$(date -u +%s)}

[bundle]
format=verity

[image.rootfs]
filename=$name
MANIFEST
rm -f "$OUT"
rauc bundle --cert "$RAUC_CERT" --key "$RAUC_KEY" --keyring "$RAUC_KEYRING" "$work/content" "$OUT" >/dev/null
rauc info --keyring "$RAUC_KEYRING" "$OUT" >/dev/null
rauc extract --keyring "$RAUC_KEYRING" "$OUT" "$work/check" >/dev/null
echo "$OUT: RAUC bundle $VERSION for $COMPATIBLE, signature and payload verified"

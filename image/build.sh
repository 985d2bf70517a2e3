#!/bin/bash
# build.sh [OUTDIR]: builds the StoreLink Raspberry Pi OS (64-bit) SD card image with a pinned pi-gen.
#
# Needs a Debian/Ubuntu x86_64 or arm64 host with git and either Docker (the default: pi-gen's
# build-docker.sh) or pi-gen's own dependencies (PI_GEN_NATIVE=1, see pi-gen's README), plus network access
# to the Raspberry Pi and Debian archives and PyPI. Takes 30-60 minutes. The admin account's password must
# come from the environment (FIRST_USER_PASS); it is never committed.
#
#   FIRST_USER_PASS=... RAUC_KEYRING=pki/ca.pem [RAUC_CERT=pki/signing.pem RAUC_KEY=pki/signing.key] \
#       image/build.sh out/
#
# RAUC_KEYRING (required): the OS-signing CA every appliance trusts for OS updates (image/rauc/make-keys.sh).
# With RAUC_CERT and RAUC_KEY the build also writes the OS update bundle of the same image
# (out/storelink-os-<version>.raucb: the image's root partition, signed; image/rauc/build-bundle.sh).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
OUT=$(realpath -m "${1:-$REPO/image/work/deploy}")
WORK=$REPO/image/work
# The builder is pinned: a release tag of pi-gen's arm64 branch, and optionally the exact commit it must be.
PI_GEN_URL=${PI_GEN_URL:-https://github.com/RPi-Distro/pi-gen.git}
PI_GEN_REF=${PI_GEN_REF:-2024-11-19-raspios-bookworm-arm64}
PI_GEN_COMMIT=${PI_GEN_COMMIT:-}

: "${FIRST_USER_PASS:?set FIRST_USER_PASS (the storelink-admin console password) in the environment}"
: "${RAUC_KEYRING:?set RAUC_KEYRING to the OS-signing CA certificate (image/rauc/make-keys.sh)}"
RAUC_KEYRING=$(realpath "$RAUC_KEYRING")

mkdir -p "$WORK" "$OUT"
if [[ ! -d $WORK/pi-gen/.git ]]; then
    git clone --quiet --branch "$PI_GEN_REF" --depth 1 "$PI_GEN_URL" "$WORK/pi-gen"
fi
git -C "$WORK/pi-gen" fetch --quiet --depth 1 origin "refs/tags/$PI_GEN_REF:refs/tags/$PI_GEN_REF"
git -C "$WORK/pi-gen" checkout --quiet --force "$PI_GEN_REF"
git -C "$WORK/pi-gen" clean -fdxq -e work -e deploy
commit=$(git -C "$WORK/pi-gen" rev-parse HEAD)
if [[ -n $PI_GEN_COMMIT && $commit != "$PI_GEN_COMMIT" ]]; then
    echo "pi-gen $PI_GEN_REF is $commit, expected $PI_GEN_COMMIT: refusing to build" >&2
    exit 1
fi

# Our stage goes inside the pi-gen tree (build-docker.sh only sees that tree), with the source it installs.
rm -rf "$WORK/pi-gen/stage-storelink"
cp -r "$HERE/stage-storelink" "$WORK/pi-gen/stage-storelink"
mkdir -p "$WORK/pi-gen/stage-storelink/00-storelink/files"
git -C "$REPO" archive --format=tar.gz -o "$WORK/pi-gen/stage-storelink/00-storelink/files/storelink-src.tar.gz" HEAD
cp "$RAUC_KEYRING" "$WORK/pi-gen/stage-storelink/00-storelink/files/rauc-keyring.pem"
# Only the StoreLink image is wanted, not the plain Lite image stage2 would also export.
touch "$WORK/pi-gen/stage2/SKIP_IMAGES"

{
    cat "$HERE/pi-gen.config"
    printf 'FIRST_USER_PASS=%q\n' "$FIRST_USER_PASS"
    # Reproducible timestamps inside the image: the commit time of the StoreLink source.
    printf 'SOURCE_DATE_EPOCH=%s\n' "$(git -C "$REPO" log -1 --format=%ct)"
} >"$WORK/pi-gen/config"
chmod 600 "$WORK/pi-gen/config"

cd "$WORK/pi-gen"
if [[ ${PI_GEN_NATIVE:-0} == 1 ]]; then
    ./build.sh
else
    CONTINUE=${CONTINUE:-0} ./build-docker.sh
fi
rm -f "$WORK/pi-gen/config"

cp deploy/*storelink*.img.xz "$OUT"/
{
    echo "storelink_commit=$(git -C "$REPO" rev-parse HEAD)"
    echo "pi_gen_ref=$PI_GEN_REF"
    echo "pi_gen_commit=$commit"
} >"$OUT/storelink-image.manifest"
if [[ -n ${RAUC_CERT:-} && -n ${RAUC_KEY:-} ]]; then
    # The OS update bundle: the image's root partition (partition 2) as an ext4 image, signed for RAUC.
    img=$(find deploy -maxdepth 1 -name '*storelink*.img.xz' | sort | tail -1)
    raw=$WORK/storelink.img
    xz -dc "$img" >"$raw"
    read -r start sectors < <(sfdisk -J "$raw" | python3 -c 'import json,sys
p = json.load(sys.stdin)["partitiontable"]["partitions"][1]; print(p["start"], p["size"])')
    dd if="$raw" of="$WORK/rootfs.ext4" bs=512 skip="$start" count="$sectors" status=none
    version=$(date -u -d "@$(git -C "$REPO" log -1 --format=%ct)" +%Y.%m.%d)-$(git -C "$REPO" rev-parse --short HEAD)
    RAUC_KEYRING=$RAUC_KEYRING VERSION=$version "$HERE/rauc/build-bundle.sh" "$WORK/rootfs.ext4" \
        "$OUT/storelink-os-$version.raucb"
    rm -f "$raw" "$WORK/rootfs.ext4"
fi
(cd "$OUT" && shopt -s nullglob && sha256sum ./*.img.xz ./*.raucb >SHA256SUMS)
echo "image and manifest in $OUT"

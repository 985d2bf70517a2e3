#!/bin/bash -e
# pi-gen runs this on the build host with ROOTFS_DIR set. files/storelink-src.tar.gz is the StoreLink source
# tree put there by image/build.sh. Wheels are built inside the arm64 root (through qemu-user) because some
# dependencies (evdev) ship no arm64 wheel, then install-into-root.sh installs exactly as the CI chroot
# test does.
SRC=/tmp/storelink-src
rm -rf "${ROOTFS_DIR}${SRC}" "${ROOTFS_DIR}/tmp/storelink-wheels"
mkdir -p "${ROOTFS_DIR}${SRC}"
tar -C "${ROOTFS_DIR}${SRC}" -xzf files/storelink-src.tar.gz
on_chroot <<CHROOT
set -e
python3 -m venv /tmp/storelink-build
/tmp/storelink-build/bin/pip install --quiet --upgrade pip wheel
/tmp/storelink-build/bin/pip wheel --quiet --wheel-dir /tmp/storelink-wheels \
    -c ${SRC}/image/requirements.lock "${SRC}[all]"
rm -rf /tmp/storelink-build
CHROOT
cp "${ROOTFS_DIR}${SRC}/image/requirements.lock" "${ROOTFS_DIR}/tmp/storelink-wheels/"
RAUC_KEYRING=files/rauc-keyring.pem "${ROOTFS_DIR}${SRC}/image/install-into-root.sh" "${ROOTFS_DIR}" \
    "${ROOTFS_DIR}/tmp/storelink-wheels"
rm -rf "${ROOTFS_DIR}${SRC}" "${ROOTFS_DIR}/tmp/storelink-wheels"

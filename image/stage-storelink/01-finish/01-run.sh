#!/bin/bash -e
# The compilers were only needed to build wheels; the appliance does not carry them.
on_chroot <<CHROOT
set -e
apt-get purge -y python3-dev gcc libc6-dev linux-libc-dev
apt-get autoremove -y --purge
apt-get clean
CHROOT
# Where the installer drops the store's files (image/README.md); FAT has no owners, so nothing else to set.
install -d "${ROOTFS_DIR}/boot/firmware/storelink"
# The journal lives in RAM (the root is an overlay); keep it bounded. Warnings and worse also go to the
# console, which is all a technician with a screen gets.
install -d "${ROOTFS_DIR}/etc/systemd/journald.conf.d"
cat >"${ROOTFS_DIR}/etc/systemd/journald.conf.d/storelink.conf" <<CONF
[Journal]
Storage=volatile
RuntimeMaxUse=64M
ForwardToConsole=yes
MaxLevelConsole=warning
CONF

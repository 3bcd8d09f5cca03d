# Sourced by the initramfs /init (PID 1) once the modules are loaded: boot the rootfs on vda.
mkdir -p /newroot && mount -t ext4 /dev/vda /newroot || { echo "T_ROOT_MOUNT_FAILED"; return 1; }
for d in dev proc sys; do mount --move /$d /newroot/$d; done
exec switch_root /newroot /sbin/guest-init

#!/bin/busybox sh
# PID 1 of parsrv's test VMs, first stage (the initramfs's /init, packed by
# `cargo xtask test --vm`): loads 9p, mounts the host's root file system read-only as the
# VM's root (as virtme-ng does), with empty tmpfs on /tmp, /run and /var/tmp, a writable
# share for the test results, and hands over to the second stage (init.sh), which runs the
# tests with the host's own programs (the test binaries, cargo-nextest, ip, BIRD, Python).
# Exiting would panic the kernel ("Attempted to kill init"), so every path ends in poweroff.

/bin/busybox --install -s /bin
export PATH=/bin
say() { echo "parsrv-vm: $*"; }
refuse() { say "error: $*"; poweroff -f; sleep 10; }

mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
# The modules 9p needs, in dependency order (none for a kernel with 9p built in).
for module in $(cat /modules/order); do
    insmod "/modules/$module" || refuse "insmod $module failed"
done
for word in $(cat /proc/cmdline); do
    case "$word" in
        parsrv.results=*) results="${word#parsrv.results=}" ;;
        parsrv.workspace=*) workspace="${word#parsrv.workspace=}" ;;
    esac
done
share=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "ro,$share,cache=loose" hostroot /newroot || refuse "no-9p"
# A workspace under one of the directories the tmpfs below cover (a clone in /tmp, as CI
# may make) is bound back over them from a view of the host's root taken first.
mkdir -p /host && mount --bind /newroot /host
mount -t tmpfs -o mode=755 tmpfs /newroot/run
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
mount -t tmpfs -o mode=1777 tmpfs /newroot/var/tmp
case "$workspace" in
    /tmp/*|/var/tmp/*|/run/*)
        mkdir -p "/newroot$workspace"
        mount --bind "/host$workspace" "/newroot$workspace" || refuse "binding the workspace $workspace failed"
        ;;
esac
umount /host
mkdir -p /newroot/run/vm/modules
cp /bin/busybox /init.sh /newroot/run/vm/
# The kernel package's modules, for autoloading (absent for a bzImage by path).
mount -t 9p -o "ro,$share" modules /newroot/run/vm/modules 2>/dev/null
# Where nextest keeps its results (target/nextest): the host reads them after power-off.
mount -t 9p -o "rw,$share" results "/newroot$results" || refuse "mounting the results share at $results failed"
mount --move /dev /newroot/dev
umount /proc
exec switch_root /newroot /run/vm/busybox sh /run/vm/init.sh

#!/bin/busybox sh
# PID 1 of parsrv's test VMs (packed into the initramfs by `cargo xtask test --vm`).
#
# Mounts what parsrv and the tests use, checks the kernel can run them at all, runs each
# integration test binary once (one test at a time, as on the host), and powers off. The
# runner reads the serial console: every line it acts on starts with "parsrv-vm: ".
# Exiting would panic the kernel ("Attempted to kill init"), so every path ends in poweroff.

/bin/busybox --install -s /bin
export PATH=/bin HOME=/root

say() { echo "parsrv-vm: $*"; }
stop() { sync; poweroff -f; sleep 10; }
refuse() { say "error: $*"; stop; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
say "kernel $(uname -r)"

# Kernels parsrv cannot run on at all: the runner turns these into one error each.
[ -e /proc/sys/kernel/unprivileged_bpf_disabled ] || refuse "no-bpf"
mount -t bpf bpf /sys/fs/bpf || refuse "no-bpffs"
[ -e /sys/kernel/btf/vmlinux ] || refuse "no-btf"
ip link set lo up

# What parsrv finds here (informational: the tests decide what a missing feature means).
/opt/parsrv/parsrv kernel

export PARSRV_BIN=/opt/parsrv/parsrv PARSRV_TEST_SKIPS=/tmp/skips RUST_BACKTRACE=1
# The runner passes the test binaries' arguments on the kernel command line, joined by
# commas, so that one image serves every filter.
for word in $(cat /proc/cmdline); do
    case "$word" in parsrv.test-args=*) args="${word#parsrv.test-args=}" ;; esac
done
IFS=,
set -- $args
unset IFS
failed=0
for binary in $(cat /opt/parsrv/tests.list); do
    say "run $binary"
    "/opt/parsrv/tests/$binary" --ignored --test-threads=1 "$@"
    status=$?
    say "exit $binary $status"
    [ "$status" = 0 ] || failed=$((failed + 1))
done
[ -s /tmp/skips ] && sed 's/^/parsrv-vm: skip /' /tmp/skips
say "done failed-binaries=$failed"
stop

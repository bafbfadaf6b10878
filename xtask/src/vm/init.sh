#!/bin/busybox sh
# PID 1 of parsrv's test VMs (packed into the initramfs by `cargo xtask test --vm`).
#
# Mounts what the tests use (not bpffs: see below), checks the kernel can run them at all, runs each
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
# bpffs is left unmounted, as on a machine that has just booted: each test mounts its own,
# and parsrv mounts it where it is missing.
grep -qw bpf /proc/filesystems || refuse "no-bpffs"
[ -e /sys/kernel/btf/vmlinux ] || refuse "no-btf"
ip link set lo up

# What parsrv finds here (informational: the tests decide what a missing feature means).
/opt/parsrv/parsrv kernel

# The tests check that they start from a fresh machine's state (no bpffs, no /run/parsrv);
# those that need Python, or iproute2, nsenter and BIRD (the cluster's), skip, saying so:
# this image has none.
export PARSRV_BIN=/opt/parsrv/parsrv PARSRV_TEST_SKIPS=/tmp/skips PARSRV_TEST_FIGURES=/tmp/figures RUST_BACKTRACE=1 \
    PARSRV_TEST_FRESH_MACHINE=1 PARSRV_TEST_NO_PYTHON=1 PARSRV_TEST_NO_NETWORK_TOOLS=1
# The runner passes the test binaries' arguments on the kernel command line, joined by
# commas, so that one image serves every filter.
for word in $(cat /proc/cmdline); do
    case "$word" in parsrv.test-args=*) args="${word#parsrv.test-args=}" ;; esac
done
IFS=,
set -- $args
unset IFS
failed=0
# A binary still running after this long is hung: its processes are shown and killed, and
# the next binary runs. The runner's --timeout covers the VM as a whole.
limit=300
for binary in $(cat /opt/parsrv/tests.list); do
    say "run $binary"
    started=$(date +%s)
    # --nocapture: a test's own progress lines reach the console as they happen, so the
    # last one names where a hung test stopped.
    timeout -s KILL "$limit" "/opt/parsrv/tests/$binary" --ignored --test-threads=1 --nocapture "$@"
    status=$?
    # SIGKILLed at the limit (not by the OOM killer, which would be sooner).
    if [ "$status" = 137 ] && [ $(($(date +%s) - started)) -ge "$limit" ]; then
        say "hung $binary: killed after $limit s; its processes and the spawners' logs:"
        for proc in /proc/[0-9]*; do
            # Not this init, nor kernel threads (they have no executable).
            [ "${proc#/proc/}" = 1 ] || [ ! -e "$proc/exe" ] && continue
            echo "  pid ${proc#/proc/} $(cat "$proc/comm" 2>/dev/null) state $(cut -d' ' -f3 "$proc/stat" 2>/dev/null) wchan $(cat "$proc/wchan" 2>/dev/null)"
        done
        for log in /tmp/parsrv-test-*.log; do
            [ -f "$log" ] && { echo "  == $log (last 40 lines)"; tail -n 40 "$log"; }
        done
        # Everything but this init: the next binary starts clean.
        kill -9 -1
        sleep 1
    fi
    say "exit $binary $status"
    [ "$status" = 0 ] || failed=$((failed + 1))
done
[ -s /tmp/skips ] && sed 's/^/parsrv-vm: skip /' /tmp/skips
[ -s /tmp/figures ] && sed 's/^/parsrv-vm: figure /' /tmp/figures
say "done failed-binaries=$failed"
stop

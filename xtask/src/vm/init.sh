# PID 1 of parsrv's test VMs, second stage (see stage1.sh): the root is the host's, read-only.
#
# Mounts what the tests use (not bpffs: see below), checks the kernel can run them at all,
# runs the integration tests with cargo-nextest as the host does (the `parallel` profile,
# then the `serial` one, .config/nextest.toml), and powers off. The runner reads the serial
# console: every line it acts on starts with "parsrv-vm: ", or is one of nextest's.

B=/run/vm/busybox
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb LANG=C.UTF-8
say() { echo "parsrv-vm: $*"; }
stop() { $B sync; $B poweroff -f; $B sleep 10; }
refuse() { say "error: $*"; stop; }

$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mkdir -p /dev/pts /dev/shm
$B mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
$B mount -t tmpfs -o mode=1777 tmpfs /dev/shm
$B mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
$B hostname parsrv-vm
say "kernel $($B uname -r)"

# Modules the tests need on demand (veth, bridge, sch_ingress): the host's modprobe reads
# the kernel package's tree.
if [ -d /run/vm/modules/lib/modules ]; then
    printf '#!/run/vm/busybox sh\nexec /sbin/modprobe -d /run/vm/modules "$@"\n' > /run/vm/modprobe
    $B chmod 755 /run/vm/modprobe
    echo /run/vm/modprobe > /proc/sys/kernel/modprobe
fi

# Kernels parsrv cannot run on at all: the runner turns these into one error each.
[ -e /proc/sys/kernel/unprivileged_bpf_disabled ] || refuse "no-bpf"
# bpffs is left unmounted, as on a machine that has just booted: each test mounts its own,
# and parsrv mounts it where it is missing.
grep -qw bpf /proc/filesystems || refuse "no-bpffs"
[ -e /sys/kernel/btf/vmlinux ] || refuse "no-btf"
$B ip link set lo up

for word in $(cat /proc/cmdline); do
    case "$word" in
        parsrv.workspace=*) workspace="${word#parsrv.workspace=}" ;;
        parsrv.bin=*) parsrv="${word#parsrv.bin=}" ;;
        parsrv.nextest=*) nextest="${word#parsrv.nextest=}" ;;
        parsrv.pyenv=*) pyenv="${word#parsrv.pyenv=}" ;;
        parsrv.filter=*) filter="${word#parsrv.filter=}" ;;
        parsrv.stress=*) stress="--stress-count ${word#parsrv.stress=}" ;;
        parsrv.partition=*) partition="--partition ${word#parsrv.partition=}" ;;
    esac
done
meta="$workspace/target/vm/nextest"

# What parsrv finds here (informational: the tests decide what a missing feature means).
"$parsrv" kernel

# The tests check that they start from a fresh machine's state (no bpffs, no /run/parsrv).
export PARSRV_BIN="$parsrv" PARSRV_PYENV="$pyenv" \
    PARSRV_TEST_SKIPS=/tmp/skips PARSRV_TEST_FIGURES=/tmp/figures \
    PARSRV_TEST_KERNEL_PROBE=/tmp/kernel-probe RUST_BACKTRACE=1 \
    PARSRV_TEST_FRESH_MACHINE=1 PARSRV_TEST_HOST_ONLY=/tmp/host-only
failed=0
# The parallel profile as many at a time as the VM has CPUs (natively 4 on 2 cores: most
# of a test is waiting, which emulation makes rarer).
threads=$($B nproc)
for profile in parallel serial; do
    say "run $profile"
    jobs=
    [ "$profile" = parallel ] && jobs="--test-threads $threads"
    # The build the host made, run from where it is (read-only): no cargo here.
    "$nextest" nextest run --binaries-metadata "$meta/binaries.json" \
        --cargo-metadata "$meta/cargo.json" --workspace-remap "$workspace" \
        --profile "$profile" --run-ignored only --no-fail-fast --no-tests warn \
        --hide-progress-bar $jobs $stress $partition $filter
    status=$?
    say "exit $profile $status"
    [ "$status" = 0 ] || failed=$((failed + 1))
done
[ -s /tmp/skips ] && sed 's/^/parsrv-vm: skip /' /tmp/skips
[ -s /tmp/figures ] && sed 's/^/parsrv-vm: figure /' /tmp/figures
[ -s /tmp/host-only ] && sed 's/^/parsrv-vm: host-only /' /tmp/host-only
say "done failed-binaries=$failed"
stop

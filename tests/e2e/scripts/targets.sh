#!/bin/sh
# End-to-end run of the ublk shim's reference targets, inside the test VM (as root, in the
# repo directory): tools/vm/run --disk 64M -- sh tests/e2e/scripts/targets.sh
#
# Steps print "OK <step>" when they pass and "RESULT <job>: <fio summary>" for the figures;
# the first failure prints "FAIL <why>" and exits non-zero. tests/e2e/test_ublk_targets.py
# checks these lines.
set -eu

PY=${PYTHON:-python3}       # the shim is stdlib only: the guest's python3 will do
DISK=${1:-/dev/vdb}         # backing device of the loop target
WORK=$(mktemp -d)
RUNTIME=${FIO_RUNTIME:-3}

fail() { echo "FAIL $*"; for f in "$WORK"/*.out "$WORK"/*.err; do [ -s "$f" ] && { echo "--- $f"; cat "$f"; }; done; exit 1; }

# start NAME ARGS...: run `python -m ublk_shim ARGS` in the background; sets PID and DEV.
start() {
    name=$1; shift
    "$PY" -m ublk_shim "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    PID=$!
    i=0
    until grep -q '^/dev/ublkb' "$WORK/$name.out" 2>/dev/null; do
        kill -0 "$PID" 2>/dev/null || fail "$name: server exited: $(cat "$WORK/$name.err")"
        i=$((i + 1)); [ $i -lt 300 ] || fail "$name: no device after 60 s"
        sleep 0.2
    done
    DEV=$(head -n 1 "$WORK/$name.out")
    [ -b "$DEV" ] || fail "$name: $DEV is not a block device"
    N=${DEV#/dev/ublkb}
}

# finish NAME: SIGTERM the server, expect a clean exit and the device gone; print stats.
finish() {
    kill -TERM "$PID"
    wait "$PID" || fail "$1: server exited with status $?: $(cat "$WORK/$1.err")"
    [ ! -e "$DEV" ] && [ ! -e "/dev/ublkc$N" ] || fail "$1: $DEV still exists after exit"
    grep 'stats:' "$WORK/$1.out" || fail "$1: no stats line"
}

# fio_run NAME ARGS...: run fio, print its IOPS/BW lines as RESULT lines.
fio_run() {
    name=$1; shift
    fio --name="$name" --filename="$DEV" --direct=1 --ioengine=libaio --group_reporting \
        "$@" >"$WORK/fio-$name.log" 2>&1 || { cat "$WORK/fio-$name.log"; fail "fio $name"; }
    grep -E '^ *(read|write): IOPS=' "$WORK/fio-$name.log" | sed "s/^ */RESULT $name: /"
}

# zeros DEV OFFSET_MIB LEN_MIB: the range reads back as zeros (O_DIRECT: no page cache).
zeros() {
    dd if="$1" bs=1M skip="$2" count="$3" iflag=direct status=none | cmp -s - /dev/zero -n $(($3 << 20))
}

echo "kernel $(uname -r)"
[ -e /dev/ublk-control ] || modprobe ublk_drv

# ---- null target: parameters, throughput, zero reads --------------------------------------
start null null --size 256M
Q=/sys/block/ublkb$N/queue
[ "$(cat $Q/logical_block_size)" = 4096 ] && [ "$(cat $Q/physical_block_size)" = 4096 ] \
    || fail "block size"
[ "$(cat $Q/write_cache)" = "write back" ] && [ "$(cat $Q/fua)" = 1 ] || fail "cache/fua"
[ "$(cat $Q/discard_granularity)" = 4096 ] && [ "$(cat $Q/discard_max_bytes)" -gt 0 ] \
    && [ "$(cat $Q/write_zeroes_max_bytes)" -gt 0 ] || fail "discard parameters"
[ "$(cat $Q/max_hw_sectors_kb)" = 512 ] || fail "max io size"
[ "$(cat /sys/block/ublkb$N/size)" = $((256 << 11)) ] || fail "size"
echo "OK null parameters"
fio_run null-randread --rw=randread --bs=4k --iodepth=32 --runtime="$RUNTIME" --time_based
fio_run null-randwrite --rw=randwrite --bs=4k --iodepth=32 --runtime="$RUNTIME" --time_based
fio_run null-verify --rw=write --bs=64k --size=8M --iodepth=8 \
    --verify=pattern --verify_pattern=0x00 --do_verify=1 --verify_fatal=1
zeros "$DEV" 0 4 || fail "null reads are not zeros"
echo "OK null io"
finish null
echo "OK null deleted"

# ---- loop target on a virtio disk, two queues: write + verify at depth, flush, discard -----
start loop loop --queues 2 "$DISK"
fio_run loop-verify-4k --rw=randwrite --bs=4k --size=16M --iodepth=16 --fsync=32 \
    --verify=crc32c --do_verify=1 --verify_fatal=1
fio_run loop-verify-64k --rw=write --bs=64k --offset=16M --size=32M --iodepth=8 \
    --verify=crc32c --do_verify=1 --verify_fatal=1
echo "OK loop verify"
dd if=/dev/urandom of="$DEV" bs=1M count=2 oflag=direct status=none
blkdiscard -z -o 0 -l 1M "$DEV" || fail "write zeroes"
zeros "$DEV" 0 1 || fail "write zeroes left data"
blkdiscard -o 1M -l 1M "$DEV" || fail "discard"
blockdev --flushbufs "$DEV" && sync
echo "OK loop discard/write_zeroes/flush"
finish loop > "$WORK/loop.stats"
cat "$WORK/loop.stats"
for op in flush discard write_zeroes; do
    grep -Eq " $op=[1-9]" "$WORK/loop.stats" || fail "loop target saw no $op"
done
grep -q " failed=0" "$WORK/loop.stats" || fail "loop target failed requests"
# fio kept 16 requests in flight: the queues must have handed the target several at once.
grep -Eq " max_batch=([2-9]|[1-9][0-9]+)( |$)" "$WORK/loop.stats" \
    || fail "loop target never got more than one request per batch at depth 16"
echo "OK loop deleted"

# ---- a second add/delete cycle, deleted from another process ------------------------------
start again null --size 64M
FIRST=$N
"$PY" -m ublk_shim del "$N" || fail "del $N"
wait "$PID" || fail "server of $DEV exited with $? after an external del"
[ ! -e "$DEV" ] || fail "$DEV still there after del"
echo "OK external del"

# ---- stop/del never hang: refused while mounted, bounded wait while held open -------------
start fs loop "$DISK"
mkfs.ext4 -q -F "$DEV" >/dev/null 2>&1 || fail "mkfs"
mkdir -p "$WORK/mnt"
mount "$DEV" "$WORK/mnt" || fail "mount"
echo hello > "$WORK/mnt/f" && sync
if "$PY" -m ublk_shim del "$N" 2>"$WORK/del.err"; then fail "del of a mounted device"; fi
grep -q "mounted on" "$WORK/del.err" || fail "del message: $(cat "$WORK/del.err")"
cat "$WORK/del.err"
umount "$WORK/mnt"
exec 3<"$DEV"                                   # a plain opener
T0=$(date +%s)
if "$PY" -m ublk_shim del "$N" --timeout 3 2>"$WORK/del.err"; then fail "del while open"; fi
[ $(($(date +%s) - T0)) -lt 20 ] || fail "del took too long"
grep -q "still holds" "$WORK/del.err" || fail "del message: $(cat "$WORK/del.err")"
cat "$WORK/del.err"
wait "$PID" || fail "server exited with $? after del of an open device"
exec 3<&-
i=0; while [ -e "/dev/ublkc$N" ]; do i=$((i+1)); [ $i -lt 50 ] || fail "ublkc$N stays"; sleep 0.2; done
echo "OK busy device handling"

# ---- recovery: kill -9 a recoverable server, I/O waits, a new server takes over ------------
start rec null --size 64M --recoverable
kill -9 "$PID"; wait "$PID" 2>/dev/null || true
"$PY" -m ublk_shim list | grep "ublk $N:" | tee "$WORK/state"
dd if="$DEV" of=/dev/null bs=4k count=4 iflag=direct status=none &
DD=$!
sleep 1
kill -0 "$DD" 2>/dev/null && echo "I/O waits for a server"
start rec2 null --size 64M --recover "$N"
wait "$DD" || fail "I/O issued while the server was dead failed"
zeros "$DEV" 0 1 || fail "recovered device does not serve"
finish rec2
echo "OK recovery"

[ -z "$(ls /dev/ublkc* 2>/dev/null)" ] || fail "devices left: $(ls /dev/ublk*)"
echo "ALL OK"

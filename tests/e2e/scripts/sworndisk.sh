#!/bin/bash
# End-to-end test of sworndisk-ublk, run as root inside the VM of tools/vm/run:
#     tools/vm/run -- bash tests/e2e/scripts/sworndisk.sh
# Every step prints "@@STEP <name> PASS" or "@@STEP <name> FAIL: <why>"; the first failure
# stops the run (later steps build on earlier ones) after tearing down what was set up.
# tests/e2e/test_sworndisk_ublk.py asserts on these markers.
set -u -o pipefail

REPO=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$REPO"
PY=${SWORNDISK_PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3
CLI="$PY -m sworndisk_ublk"
W=/var/tmp/sworndisk-e2e
MNT=$W/mnt
DATA_MIB=64
SECTORS=$((DATA_MIB * 2048))

log() { echo "---- $*"; }
fail() { echo "@@STEP $STEP FAIL: $*" >&2; exit 1; }
pass() { echo "@@STEP $STEP PASS"; }
step() { STEP=$1; log "step $STEP"; }

cleanup() {
    mountpoint -q "$MNT" && umount "$MNT"
    [ -n "${HOLDER:-}" ] && kill "$HOLDER" 2>/dev/null
    [ -n "${WRITER:-}" ] && kill "$WRITER" 2>/dev/null
    $CLI del --all --wait 5 >/dev/null 2>&1
    $CLI list
}
trap cleanup EXIT

table() { echo "0 $SECTORS sworndisk $W/$1.data $W/$1.meta 0 $2"; }
devnum() { echo "${1#/dev/ublkb}"; }
server_pid() {   # pid of device $1 from `list --json`
    $CLI list --json | "$PY" -c "import json,sys; print([d['pid'] for d in json.load(sys.stdin) if d['dev_id']==$1][0])"
}
add() {          # add ARGS...: device path on stdout, fails the step otherwise
    local out
    out=$($CLI add "$@") || fail "add $* exited $?"
    case "$out" in /dev/ublkb*) echo "$out" ;; *) fail "add printed '$out'" ;; esac
}
sums() { (cd "$MNT" && sha256sum f1 f2 f3); }

# ------------------------------------------------------------------------------------------
step setup
grep -qw ext4 /proc/filesystems || modprobe ext4 || fail "no ext4 in this kernel"
rm -rf "$W"; mkdir -p "$MNT"
for d in a p; do
    truncate -s ${DATA_MIB}M "$W/$d.data"
    "$PY" - "$W/$d.meta" $((DATA_MIB << 20)) <<'EOF' || fail "cannot size meta"
import os, sys
from sworndisk import SwornDisk
n = SwornDisk.min_meta_size(int(sys.argv[2]), int(sys.argv[2]) // 4096)
open(sys.argv[1], "wb").truncate(-(-n // (1 << 20)) << 20)
EOF
done
"$PY" -c "import os; print(os.urandom(32).hex())" > "$W/key"
"$PY" -c "import os; print(os.urandom(32).hex())" > "$W/wrong.key"
chmod 600 "$W/key" "$W/wrong.key"
KEYHEX=$(cat "$W/key")
pass

step add
DEV=$(add --key-file "$W/key" "$(table a force)") || exit 1
[ -b "$DEV" ] || fail "$DEV is not a block device"
$CLI list
$CLI list --json | grep -q '"state": "alive"' || fail "list does not show it alive"
[ "$(blockdev --getsize64 "$DEV")" = $((DATA_MIB << 20)) ] || fail "wrong size"
[ "$(blockdev --getss "$DEV")" = 4096 ] || fail "logical block size is not 4096"
pass

step fio
fio --name=verify --filename="$DEV" --direct=1 --ioengine=psync --rw=randwrite --bs=4k \
    --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 --randrepeat=1 \
    --output-format=terse >/dev/null || fail "fio write+verify failed"
pass

step fiodepth
# At depth 16 the queue hands the target whole batches: READs go to the engine together
# (read_many), writes in order; every block must verify, and a FLUSH every 32 writes.
fio --name=depth --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=16 \
    --rw=randwrite --bs=4k --offset=16M --size=16M --fsync=32 --verify=crc32c \
    --do_verify=1 --verify_fatal=1 --randrepeat=1 --output-format=terse >/dev/null \
    || fail "fio write+verify at iodepth 16 failed"
fio --name=depthread --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=16 \
    --rw=randread --bs=4k --offset=16M --size=16M --verify=crc32c --verify_only \
    --verify_fatal=1 --randrepeat=1 --output-format=terse >/dev/null \
    || fail "fio re-verify at iodepth 16 (random reads) failed"
pass

step filesystem
mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 "$DEV" || fail "mkfs.ext4"
mount -o noinit_itable "$DEV" "$MNT" || fail "mount"
echo "hello sworndisk" > "$MNT/f1"
head -c 3M /dev/urandom > "$MNT/f2"
head -c 200k /dev/urandom > "$MNT/f3"
sync
SUMS=$(sums)
umount "$MNT" || fail "umount"
pass

step del
$CLI del -n "$(devnum "$DEV")" || fail "del exited $?"
[ -e "$DEV" ] && fail "$DEV still exists"
[ -z "$(ls /run/sworndisk/*.json 2>/dev/null)" ] || fail "state file left behind"
pass

step readd
DEV=$(add --key-file "$W/key" "$(table a false)") || exit 1
mount "$DEV" "$MNT" || fail "mount after re-add"
[ "$(sums)" = "$SUMS" ] || fail "files differ after re-add"
umount "$MNT"
pass

step busy
N=$(devnum "$DEV")
sleep 600 < "$DEV" & HOLDER=$!
sleep 0.5
start=$(date +%s)
out=$(timeout 60 $CLI del -n "$N" 2>&1); rc=$?
echo "$out"
[ $rc -ne 0 ] && [ $rc -ne 124 ] || fail "del of an open device exited $rc"
echo "$out" | grep -q "sworndisk-ublk: error: .*busy.*open by pid $HOLDER" || fail "no clear busy message"
out=$(timeout 60 $CLI del -n "$N" --wait 2 2>&1); rc=$?
echo "$out"
[ $rc -ne 0 ] && [ $rc -ne 124 ] || fail "del --wait 2 exited $rc"
[ $(( $(date +%s) - start )) -lt 30 ] || fail "del took too long"
kill $HOLDER; wait $HOLDER 2>/dev/null; HOLDER=
mount "$DEV" "$MNT" || fail "mount"
out=$(timeout 60 $CLI del -n "$N" 2>&1) && fail "del of a mounted device succeeded"
echo "$out"
echo "$out" | grep -q "mounted on $MNT" || fail "no mount in the busy message"
umount "$MNT"
[ -b "$DEV" ] || fail "device gone after refused del"
pass

step sigterm
# Writes that were never flushed by the writer are flushed by a clean stop (SIGTERM).
dd if=/dev/urandom of="$W/pattern" bs=64k count=16 status=none
dd if="$W/pattern" of="$DEV" bs=64k seek=256 oflag=direct status=none || fail "dd"
kill -TERM "$(server_pid "$N")"
for i in $(seq 100); do [ -e "$DEV" ] || break; sleep 0.2; done
[ -e "$DEV" ] && fail "device still there after SIGTERM"
DEV=$(add --key-file "$W/key" "$(table a false)") || exit 1
dd if="$DEV" of="$W/readback" bs=64k skip=256 count=16 iflag=direct status=none || fail "dd"
cmp "$W/readback" "$W/pattern" || fail "unflushed writes lost by a clean SIGTERM stop"
$CLI del -n "$(devnum "$DEV")" || fail "del"
pass

step wrongkey
for fmt in false true; do
    out=$($CLI add --key-file "$W/wrong.key" "$(table a $fmt)" 2>&1); rc=$?
    echo "$out"
    [ $rc -ne 0 ] || fail "wrong key accepted with format $fmt"
    echo "$out" | grep -q "^sworndisk-ublk: error: wrong key" || fail "no wrong-key message"
done
out=$($CLI add --key-file "$W/key" "0 $SECTORS sworndisk $W/a.data $W/a.meta $KEYHEX false" 2>&1) \
    && fail "key in table accepted"
echo "$out" | grep -q -- "--key-file" || fail "no --key-file hint"
echo "$out" | grep -q "$KEYHEX" && fail "key echoed"
ls /run/sworndisk/*.json 2>/dev/null && fail "state left by failed adds"
pass

step recover
DEV=$(add --recoverable --key-file "$W/key" "$(table a false)") || exit 1
N=$(devnum "$DEV")
mount "$DEV" "$MNT" || fail "mount"
head -c 2M /dev/urandom > "$MNT/flushed"; sync
FLUSHED=$(sha256sum < "$MNT/flushed")
# Paced, so that the writer is still mid-stream when the server is killed however fast it is.
# Each file's checksum is logged outside the device once its sync has returned.
: > "$W/wsums"
( set -e; for i in $(seq 16); do
    head -c 512k /dev/urandom > "$W/src"; cp "$W/src" "$MNT/w$i"; sync
    echo "w$i $(sha256sum < "$W/src")" >> "$W/wsums"; sleep 0.5; done ) &
WRITER=$!
for i in $(seq 150); do [ -e "$MNT/w3" ] && break; sleep 0.2; done
PID=$(server_pid "$N")
DMESG_LINES=$(dmesg | wc -l)
kill -0 "$WRITER" 2>/dev/null || fail "the writer finished before the kill"
kill -9 "$PID"
sleep 1
[ -b "$DEV" ] || fail "device disappeared after kill -9"
$CLI list | grep "$DEV" | grep -q dead || fail "list does not show the server dead"
out=$($CLI recover -n "$N" --key-file "$W/key" 2>&1) || fail "recover exited $?: $out"
echo "$out"
echo "$out" | grep -q "warning" && fail "recover reported a loss: $out"
[ "$(server_pid "$N")" != "$PID" ] || fail "same pid after recover"
timeout 300 tail --pid=$WRITER -f /dev/null || fail "writer hung after recover"
wait $WRITER || fail "the writer failed across the crash (exit $?)"
WRITER=
sync
dmesg | tail -n +$((DMESG_LINES + 1)) | grep -iE "error|fail" && fail "kernel errors across the crash"
[ "$(sha256sum < "$MNT/flushed")" = "$FLUSHED" ] || fail "flushed file changed"
[ "$(wc -l < "$W/wsums")" = 16 ] || fail "the writer logged $(wc -l < "$W/wsums") of 16 files"
umount "$MNT" || fail "umount"
fsck.ext4 -f -n "$DEV" || fail "fsck after recover: exit $?"
mount "$DEV" "$MNT" && [ "$(sha256sum < "$MNT/flushed")" = "$FLUSHED" ] || fail "flushed data"
while read -r name sum; do     # read from the device, not from the page cache
    [ "$(sha256sum < "$MNT/$name")" = "$sum" ] || fail "$name differs after recover"
done < "$W/wsums"
[ "$(sums)" = "$SUMS" ] || fail "old files differ after recover"
umount "$MNT"
$CLI del -n "$N" || fail "del after recover"
pass

step passphrase
echo "correct horse battery staple" | $CLI add "$(table p force)" > "$W/pdev" || fail "add with passphrase"
PDEV=$(cat "$W/pdev")
$CLI del -n "$(devnum "$PDEV")" || fail "del"
out=$(echo "wrong horse" | $CLI add "$(table p false)" 2>&1) && fail "wrong passphrase accepted"
echo "$out" | grep -q "wrong key" || fail "no wrong-key message: $out"
PDEV=$(echo "correct horse battery staple" | $CLI add "$(table p false)") || fail "reopen"
$CLI del -n "$(devnum "$PDEV")" || fail "del"
pass

step secrets
grep -rq "$KEYHEX" /run/sworndisk/ && fail "key in /run/sworndisk"
grep -rqa "correct horse" /run/sworndisk/ && fail "passphrase in /run/sworndisk"
pass

step done
pass

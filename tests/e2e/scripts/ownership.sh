#!/bin/bash
# One owner per disk and force on an existing SwornDisk (issue 7), end to end, run as root
# inside the VM of tools/vm/run with three spare disks:
#     tools/vm/run --disk 64M --disk 64M --disk 64M -- bash tests/e2e/scripts/ownership.sh
# While /dev/ublkb0 is mounted, a second `add ... force` of its images through symlinks,
# hard links or the same paths is refused (exit 5, one line naming the server), and the
# ext4 on it is intact; racing adds: exactly one wins; block devices are claimed with
# O_EXCL (also against a mount); force on a SwornDisk without a terminal needs --yes.
# Every step prints "@@STEP <name> PASS" or "@@STEP <name> FAIL: <why>" for
# tests/e2e/test_ownership.py; the first failure stops the run after teardown.
set -u -o pipefail
. "$(dirname "$0")/lib.sh"

W=/var/tmp/sworndisk-e2e-ownership
L=$W/links
MNT=$W/mnt
MNT2=$W/mnt2
DATA_MIB=64
SECTORS=$((DATA_MIB * 2048))

cleanup() {
    mountpoint -q "$MNT" && umount "$MNT"
    mountpoint -q "$MNT2" && umount "$MNT2"
    $CLI del --all --wait 5 >/dev/null 2>&1
    $CLI list
}
trap cleanup EXIT

table() { echo "0 $SECTORS sworndisk $1 $2 0 $3"; }
refused() {      # refused CODE PATTERN ARGS...: add must exit CODE with one matching line
    local code=$1 pattern=$2 out rc
    shift 2
    out=$(setsid -w $CLI add "$@" </dev/null 2>&1); rc=$?
    echo "$out"
    [ "$rc" = "$code" ] || fail "add $* exited $rc, expected $code"
    [ "$(echo "$out" | wc -l)" = 1 ] || fail "not one line"
    echo "$out" | grep -q "^sworndisk-ublk: error: .*$pattern" || fail "no '$pattern' in the error"
}
sums() { (cd "$MNT" && sha256sum f1 f2 f3); }

# ------------------------------------------------------------------------------------------
step setup
grep -qw ext4 /proc/filesystems || modprobe ext4 || fail "no ext4 in this kernel"
for d in /dev/vdb /dev/vdc /dev/vdd; do [ -b $d ] || fail "$d missing (run with three --disk)"; done
rm -rf "$W"; mkdir -p "$MNT" "$MNT2" "$L"
for d in a b; do
    images "$W/$d" $DATA_MIB
    for r in data meta; do
        ln -s "$W/$d.$r" "$L/$d.$r.sym"
        ln "$W/$d.$r" "$L/$d.$r.hard"
    done
done
ln -s /dev/vdb "$L/vdb.sym"
"$PY" -c "import os; print(os.urandom(32).hex())" > "$W/key"
chmod 600 "$W/key"
pass

step live
DEV=$(add --key-file "$W/key" "$(table $W/a.data $W/a.meta force)") || exit 1
mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 "$DEV" || fail "mkfs.ext4"
mount -o noinit_itable "$DEV" "$MNT" || fail "mount"
echo "mine, not yours" > "$MNT/f1"
head -c 3M /dev/urandom > "$MNT/f2"
head -c 200k /dev/urandom > "$MNT/f3"
sync
SUMS=$(sums)
pass

step symlink
refused 5 "data device $L/a.data.sym (= $W/a.data) is in use: locked by pid [0-9]* (.*serving $DEV)" \
    --yes --key-file "$W/key" "$(table $L/a.data.sym $L/a.meta.sym force)"
# busy comes before the question: without --yes and without a terminal, still busy
refused 5 "is in use" --key-file "$W/key" "$(table $L/a.data.sym $L/a.meta.sym force)"
pass

step hardlink
refused 5 "data device $L/a.data.hard is in use: locked by pid [0-9]* (.*serving $DEV)" \
    --yes --key-file "$W/key" "$(table $L/a.data.hard $L/a.meta.hard force)"
pass

step samepath
refused 5 "data device $W/a.data is in use: locked by pid [0-9]* (.*serving $DEV)" \
    --yes --key-file "$W/key" "$(table $W/a.data $W/a.meta force)"
refused 5 "is in use" --key-file "$W/key" "$(table $W/a.data $W/a.meta false)"
pass

step race
( $CLI add --yes --key-file "$W/key" "$(table $W/b.data $W/b.meta force)" >"$W/race1" 2>&1
  echo $? >"$W/race1.rc" ) &
( $CLI add --yes --key-file "$W/key" "$(table $L/b.data.sym $L/b.meta.sym force)" >"$W/race2" 2>&1
  echo $? >"$W/race2.rc" ) &
wait
cat "$W/race1" "$W/race2"
[ "$(sort "$W/race1.rc" "$W/race2.rc" | tr '\n' ' ')" = "0 5 " ] ||
    fail "racing adds exited $(cat "$W/race1.rc") and $(cat "$W/race2.rc"), expected 0 and 5"
for i in 1 2; do
    if [ "$(cat "$W/race$i.rc")" = 0 ]; then
        WON=$(head -1 "$W/race$i")
    else
        grep -q "^sworndisk-ublk: error: .*is in use" "$W/race$i" || fail "loser: no busy line"
        [ "$(wc -l < "$W/race$i")" = 1 ] || fail "loser: not one line"
    fi
done
[ -b "$WON" ] || fail "the winner's $WON is not a block device"
$CLI del -n "$(devnum "$WON")" || fail "del of the winner"
pass

step blockdev
BDEV=$(add --key-file "$W/key" "$(table /dev/vdb /dev/vdc force)") || exit 1
refused 5 "data device $L/vdb.sym (= /dev/vdb) is in use: .*serving $BDEV" \
    --yes --key-file "$W/key" "$(table $L/vdb.sym /dev/vdc force)"
$CLI del -n "$(devnum "$BDEV")" || fail "del"
mkfs.ext4 -q -F /dev/vdd || fail "mkfs.ext4 /dev/vdd"
mount /dev/vdd "$MNT2" || fail "mount /dev/vdd"
refused 5 "data device /dev/vdd is in use: mounted on $MNT2" \
    --yes --key-file "$W/key" "$(table /dev/vdd /dev/vdc force)"
engine_refuses() {   # the engine itself, without the CLI's early check
    "$PY" - "$MNT2" <<'EOF'
import errno, sys
from sworndisk import DeviceBusyError, SwornDisk
try:
    SwornDisk.create("/dev/vdd", "/dev/vdc", bytes(32))
except DeviceBusyError as e:
    print(e)
    sys.exit(0 if e.errno == errno.EBUSY and f"mounted on {sys.argv[1]}" in str(e) else 1)
sys.exit("formatted a mounted device")
EOF
}
out=$(engine_refuses 2>&1) || fail "the engine did not refuse a mounted device: $out"
echo "$out"
umount "$MNT2"
pass

step intact
[ "$(sums)" = "$SUMS" ] || fail "files changed under the mounted ext4"
[ "$(cat "$MNT/f1")" = "mine, not yours" ] || fail "f1 changed"
umount "$MNT" || fail "umount"
fsck.ext4 -f -n "$DEV" || fail "fsck after the refused adds: exit $?"
$CLI del -n "$(devnum "$DEV")" || fail "del"
pass

step force
# a SwornDisk that nothing uses: force without a terminal and without --yes is refused
META_SUM=$(sha256sum < "$W/a.meta")
refused 2 "holds a SwornDisk.*--yes" --key-file "$W/key" "$(table $W/a.data $W/a.meta force)"
[ "$(sha256sum < "$W/a.meta")" = "$META_SUM" ] || fail "the refused force wrote to the meta"
DEV=$(add --key-file "$W/key" "$(table $L/a.data.sym $L/a.meta.hard false)") || exit 1
mount "$DEV" "$MNT" || fail "mount after the refused force"
[ "$(sums)" = "$SUMS" ] || fail "files differ after the refused force"
umount "$MNT"
$CLI del -n "$(devnum "$DEV")" || fail "del"
pass

step done
pass

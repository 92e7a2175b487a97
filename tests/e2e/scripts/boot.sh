#!/bin/bash
# Named disks, the tab file, read-only and forced/deferred removal (issue 16), end to end,
# run as root inside the VM of tools/vm/run with two extra disks:
#     tools/vm/run --disk 64M --disk 32M -- bash tests/e2e/scripts/boot.sh
# Two disks in a tab (home: image files; spare: /dev/vdb + its meta /dev/vdc named by
# UUID=, noauto): start --all brings up home only, ext4 through /dev/sworndisk/home, stop
# --all and start again keep the files; a second live `home` is refused; recover NAME after
# kill -9 keeps the link; a read-only disk refuses writes and leaves both images' bytes
# unchanged; del --force under fio at depth 32; del --deferred of a mounted disk. Every step
# prints "@@STEP <name> PASS" or "@@STEP <name> FAIL: <why>" for tests/e2e/test_boot.py.
set -u -o pipefail
. "$(dirname "$0")/lib.sh"

W=/var/tmp/sworndisk-e2e-boot
MNT=$W/mnt
TAB=$W/sworndisktab
DATA_MIB=64
SECTORS=$((DATA_MIB * 2048))
LINKS=/dev/sworndisk

cleanup() {
    mountpoint -q "$MNT" && umount "$MNT"
    $CLI del --all --force >/dev/null 2>&1
    $CLI list
}
trap cleanup EXIT

table() { echo "0 $SECTORS sworndisk $1 $2 0 $3"; }
dev_of() { readlink "$LINKS/$1"; }           # the link's target, never followed
gone_within() {  # gone_within SEC PATH: PATH disappears within SEC seconds
    local i
    for ((i = 0; i < $1 * 10; i++)); do [ -e "$2" ] || return 0; sleep 0.1; done
    return 1
}
images_hash() { cat "$@" | sha256sum; }
shown() { echo "\$ sworndisk-ublk $*"; $CLI "$@"; }   # for the transcript

# ------------------------------------------------------------------------------------------
step setup
grep -qw ext4 /proc/filesystems || modprobe ext4 || fail "no ext4 in this kernel"
rm -rf "$W"; mkdir -p "$MNT"
images "$W/home" $DATA_MIB
"$PY" -c "import os; print(os.urandom(32).hex())" > "$W/key"
chmod 600 "$W/key"
[ -b /dev/vdb ] && [ -b /dev/vdc ] || fail "the VM has no /dev/vdb and /dev/vdc (--disk 64M --disk 32M)"
pass

step format
DEV=$(add --key-file "$W/key" --name home "$(table "$W/home.data" "$W/home.meta" force)") || exit 1
[ "$(dev_of home)" = "$DEV" ] || fail "$LINKS/home -> '$(dev_of home)', not $DEV"
mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 "$LINKS/home" || fail "mkfs.ext4"
mount "$LINKS/home" "$MNT" || fail "mount $LINKS/home"
head -c 4M /dev/urandom > "$MNT/f1" && sync -f "$MNT" || fail "write f1"
SUM=$(sha256sum < "$MNT/f1")
umount "$MNT"
$CLI del home || fail "del home"
[ -L "$LINKS/home" ] && fail "del left $LINKS/home"
DEV=$(add --key-file "$W/key" "$(table /dev/vdb /dev/vdc force)") || exit 1
$CLI del "$DEV" || fail "del spare"
UUID=$($CLI dump /dev/vdc --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["uuid"])') \
    || fail "dump /dev/vdc"
cat > "$TAB" <<EOF
# name  data              meta              key          options
home    $W/home.data      $W/home.meta      $W/key       depth=32
spare   /dev/vdb          UUID=$UUID        $W/key       noauto,recoverable
EOF
cat "$TAB"
pass

step start
shown start --all --tab "$TAB" || fail "start --all exited $?"
[ -L "$LINKS/home" ] || fail "home is not up"
[ -e "$LINKS/spare" ] && fail "spare (noauto) was started"
shown list || fail "list"
$CLI list --json | "$PY" -c '
import json, sys
rows = json.load(sys.stdin)
assert [r["name"] for r in rows] == ["home"], rows' || fail "list does not show home alone"
mount "$LINKS/home" "$MNT" && [ "$(sha256sum < "$MNT/f1")" = "$SUM" ] || fail "f1 via the tab"
echo hello > "$MNT/f2" && sync -f "$MNT" || fail "write f2"
shown status home || fail "status home"
$CLI status "$LINKS/home" --json >/dev/null || fail "status $LINKS/home"
out=$($CLI start --all --tab "$TAB" 2>&1) || fail "start --all again exited $?: $out"
echo "$out" | grep -q "$TAB:2: home is already up" || fail "no note for the disk already up: $out"
pass

step dupname
mkdir -p "$W/other"; images "$W/other/x" $DATA_MIB
out=$($CLI add --key-file "$W/key" --name home "$(table "$W/other/x.data" "$W/other/x.meta" force)" 2>&1); rc=$?
echo "$out"
[ "$rc" = 5 ] && echo "$out" | grep -q "the name 'home' is in use by" || fail "a live name taken again: exit $rc"
pass

step stop
umount "$MNT"
shown stop --all --tab "$TAB" || fail "stop --all exited $?"
[ -e "$LINKS/home" ] || [ -L "$LINKS/home" ] && fail "stop left $LINKS/home"
[ -z "$($CLI list --json | "$PY" -c 'import json,sys; print(len(json.load(sys.stdin)) or "")')" ] \
    || fail "disks left after stop --all"
$CLI start --all --tab "$TAB" || fail "start --all after stop exited $?"
mount "$LINKS/home" "$MNT" && [ "$(sha256sum < "$MNT/f1")" = "$SUM" ] \
    && [ "$(cat "$MNT/f2")" = hello ] || fail "files not intact after stop/start"
umount "$MNT"
$CLI start --tab "$TAB" spare || fail "start spare (UUID=) exited $?"
[ "$($CLI list --json | "$PY" -c 'import json,sys; print(" ".join(r["meta"] for r in json.load(sys.stdin) if r["name"] == "spare"))')" = /dev/vdc ] \
    || fail "spare's UUID= did not resolve to /dev/vdc"
$CLI stop --all --tab "$TAB" || fail "stop --all exited $?"
pass

step recover
$CLI start --tab "$TAB" spare || fail "start spare"
DEV=$(dev_of spare)
PID=$($CLI list --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)[0]["pid"])')
kill -9 "$PID"; sleep 1
[ "$(dev_of spare)" = "$DEV" ] || fail "the link changed when the server died"
$CLI recover spare --key-file "$W/key" || fail "recover spare exited $?"
[ "$(dev_of spare)" = "$DEV" ] && [ -b "$DEV" ] || fail "the link is not kept across recover"
dd if="$LINKS/spare" of=/dev/null bs=1M count=4 iflag=direct status=none || fail "read after recover"
$CLI del spare || fail "del spare"
[ -L "$LINKS/spare" ] && fail "del left the link of spare"
pass

step readonly
BEFORE=$(images_hash "$W/home.data" "$W/home.meta")
DEV=$(add --key-file "$W/key" --read-only --name ro "$(table "$W/home.data" "$W/home.meta" false)") || exit 1
[ "$(blockdev --getro "$LINKS/ro")" = 1 ] || fail "blockdev --getro says $(blockdev --getro "$LINKS/ro")"
dd if=/dev/zero of="$DEV" bs=4k count=1 oflag=direct status=none 2>/dev/null && fail "a write was accepted"
mount -o ro,noload "$LINKS/ro" "$MNT" || fail "mount -o ro"
[ "$(sha256sum < "$MNT/f1")" = "$SUM" ] || fail "f1 read-only"
touch "$MNT/new" 2>/dev/null && fail "a file was created on a read-only mount"
umount "$MNT"
dd if="$DEV" of=/dev/null bs=1M iflag=direct status=none || fail "read the whole device"
$CLI list | grep -q "^ro .* ro " || fail "list does not show the mode"
$CLI del ro || fail "del ro"
[ "$(images_hash "$W/home.data" "$W/home.meta")" = "$BEFORE" ] || fail "the images changed"
pass

step force
images "$W/f" $DATA_MIB
DEV=$(add --key-file "$W/key" --name f "$(table "$W/f.data" "$W/f.meta" force)") || exit 1
head -c 4M /dev/urandom > "$W/pattern"
dd if="$W/pattern" of="$LINKS/f" bs=1M oflag=direct conv=fsync status=none || fail "pattern"
fio --name=busy --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=32 --rw=randwrite \
    --bs=4k --offset=8M --size=8M --time_based --runtime=300 --output-format=terse \
    > "$W/fio.out" 2>&1 &
FIO=$!
sleep 3
kill -0 $FIO 2>/dev/null || fail "fio ended early: $(cat "$W/fio.out")"
out=$($CLI del f 2>&1) && fail "del of a busy device succeeded"
echo "$out"
ms() { echo $(( ($(date +%s%N) - t0) / 1000000 )); }
t0=$(date +%s%N); $CLI list >/dev/null; cli_alone=$(ms)      # the CLI's start-up under TCG
kill -0 $FIO 2>/dev/null || fail "fio ended before del --force: $(cat "$W/fio.out")"
t0=$(date +%s%N)
$CLI del --force f & DEL=$!
gone_within 30 "$DEV" || fail "$DEV still there 30 s after del --force started"
gone=$(ms)
for ((i = 0; i < 300; i++)); do kill -0 $FIO 2>/dev/null || break; sleep 0.1; done
kill -0 $FIO 2>/dev/null && fail "fio still runs 30 s after $DEV went"
fio_end=$(ms)
wait $DEL || fail "del --force exited $?"
del_end=$(ms)
wait $FIO; echo "fio ended with exit status $? (I/O errors expected); its error: $(tail -1 "$W/fio.out" | cut -d';' -f5)"
echo "after del --force started: $DEV gone in $gone ms, fio ended in $fio_end ms, del returned in $del_end ms (a bare 'list' takes $cli_alone ms here)"
[ -L "$LINKS/f" ] && fail "del --force left the link"
DEV=$(add --key-file "$W/key" --name f "$(table "$W/f.data" "$W/f.meta" false)") || fail "re-add after del --force"
head -c 4M "$LINKS/f" > "$W/back" && cmp "$W/back" "$W/pattern" || fail "the flushed pattern did not survive"
$CLI del f || fail "del f"
$CLI check --key-file "$W/key" "$W/f.data" "$W/f.meta" || fail "check after del --force: $?"
pass

step deferred
DEV=$(add --yes --key-file "$W/key" --name d "$(table "$W/f.data" "$W/f.meta" force)") || exit 1
mkfs.ext4 -q -F "$LINKS/d" && mount "$LINKS/d" "$MNT" || fail "mkfs/mount d"
echo kept > "$MNT/f" && sync -f "$MNT"
$CLI del --deferred d || fail "del --deferred exited $?"
shown list
$CLI list --json | "$PY" -c '
import json, sys
rows = json.load(sys.stdin)
assert rows[0]["name"] == "d" and rows[0]["pending_removal"] and rows[0]["state"] == "alive", rows' \
    || fail "list does not show d as pending removal"
$CLI list | grep -q "pending-removal" || fail "no pending-removal in list"
[ -b "$DEV" ] || fail "$DEV went while mounted"
umount "$MNT"
gone_within 10 "$DEV" || fail "$DEV still there 10 s after the unmount"
sleep 1
[ -L "$LINKS/d" ] && fail "the link of d is left"
[ "$($CLI list --json)" = "[]" ] || fail "list not empty after the deferred removal"
DEV=$(add --key-file "$W/key" --name d "$(table "$W/f.data" "$W/f.meta" false)") || exit 1
mount "$LINKS/d" "$MNT" && [ "$(cat "$MNT/f")" = kept ] || fail "d after the deferred removal"
umount "$MNT"
$CLI del d || fail "del d"
pass

step done
pass

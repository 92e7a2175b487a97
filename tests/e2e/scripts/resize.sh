#!/bin/bash
# Growing a disk (issue 17, item 1), end to end, run as root inside the VM of tools/vm/run:
#     tools/vm/run -- bash tests/e2e/scripts/resize.sh
# A disk on two image files gets ext4 and files, and is deleted; the data file is made
# larger; `resize` says in one line how large the meta file must be (exit 2, nothing
# changed), the meta file is made that large, `resize` grows the disk; added again with
# the new size it is busy for `resize` (exit 5); `resize2fs` grows ext4, the files are
# intact, df, status and check show the larger size. A disk formatted with --max-sectors
# grows with no larger meta file. Every step prints "@@STEP <name> PASS|FAIL: <why>" for
# tests/e2e/test_resize.py; the first failure stops the run after teardown.
set -u -o pipefail
. "$(dirname "$0")/lib.sh"

W=/var/tmp/sworndisk-e2e-resize
MNT=$W/mnt
SECTORS=$((64 * 2048))

cleanup() {
    mountpoint -q "$MNT" && umount "$MNT"
    $CLI del --all --wait 5 >/dev/null 2>&1
    $CLI list
}
trap cleanup EXIT

table() { echo "0 $1 sworndisk $W/d.data $W/d.meta 0 $2"; }
sectors_of() { "$PY" -c 'import json,sys; print(json.load(sys.stdin)["size"] // 512)'; }

# ------------------------------------------------------------------------------------------
step setup
grep -qw ext4 /proc/filesystems || modprobe ext4 || fail "no ext4 in this kernel"
command -v resize2fs >/dev/null || fail "no resize2fs"
rm -rf "$W"; mkdir -p "$MNT"
images "$W/d" 64
"$PY" -c "import os; print(os.urandom(32).hex())" > "$W/key"
chmod 600 "$W/key"
pass

step format
DEV=$(add --key-file "$W/key" "$(table $SECTORS force)") || exit 1
mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 "$DEV" || fail "mkfs.ext4"
mount "$DEV" "$MNT" || fail "mount"
head -c 6M /dev/urandom > "$MNT/f1" && mkdir "$MNT/dir" && head -c 300K /dev/urandom > "$MNT/dir/f2" \
    && sync -f "$MNT" || fail "write files"
(cd "$MNT" && sha256sum f1 dir/f2) > "$W/sums"
DF1=$(df -B1 --output=size "$MNT" | tail -1)
umount "$MNT"
$CLI del "$DEV" || fail "del $DEV"
pass

step meta-too-small
truncate -s 160M "$W/d.data" || fail "truncate data"
before=$(sha256sum "$W/d.data" "$W/d.meta")
out=$($CLI resize "$W/d.data" "$W/d.meta" --key-file "$W/key" 2>&1); rc=$?
echo "\$ sworndisk-ublk resize $W/d.data $W/d.meta --key-file $W/key"; echo "$out"; echo "(exit $rc)"
[ "$rc" = 2 ] || fail "resize with a small meta device: exit $rc, expected 2"
[ "$(echo "$out" | wc -l)" = 1 ] || fail "not one line: $out"
[ "$(sha256sum "$W/d.data" "$W/d.meta")" = "$before" ] || fail "the images changed"
META_SIZE=$(echo "$out" | sed -n 's/.*truncate -s \([0-9]*M\) .*/\1/p')
[ -n "$META_SIZE" ] || fail "no truncate size in: $out"
pass

step resize
truncate -s "$META_SIZE" "$W/d.meta" || fail "truncate meta"
echo "\$ truncate -s $META_SIZE $W/d.meta"
echo "\$ sworndisk-ublk resize $W/d.data $W/d.meta --key-file $W/key"
NEW=$($CLI resize "$W/d.data" "$W/d.meta" --key-file "$W/key") || fail "resize exited $?"
echo "$NEW"
[ "$NEW" -gt "$SECTORS" ] || fail "resize printed '$NEW', not more than $SECTORS sectors"
$CLI dump "$W/d.meta" | grep "logical size" | tee /dev/stderr | grep -q "$NEW sectors" \
    || fail "dump does not show $NEW sectors"
out=$($CLI add --key-file "$W/key" "$(table $SECTORS false)" 2>&1) && fail "the old size was accepted"
echo "$out" | grep -q "use <sectors> $NEW" || fail "add with the old size: $out"
pass

step readd
DEV=$(add --key-file "$W/key" "$(table "$NEW" false)") || exit 1
$CLI resize "$W/d.data" "$W/d.meta" --key-file "$W/key"; rc=$?
[ "$rc" = 5 ] || fail "resize of a live disk: exit $rc, expected 5 (busy)"
[ "$($CLI status "$DEV" --json | sectors_of)" = "$NEW" ] || fail "status does not show $NEW sectors"
$CLI status "$DEV" | grep size
[ "$(blockdev --getsz "$DEV")" = "$NEW" ] || fail "$DEV has $(blockdev --getsz "$DEV") sectors"
e2fsck -f -y "$DEV" >/dev/null; [ $? -le 1 ] || fail "e2fsck before resize2fs"
resize2fs "$DEV" || fail "resize2fs"
mount "$DEV" "$MNT" || fail "mount"
(cd "$MNT" && sha256sum -c --quiet "$W/sums") || fail "files changed"
DF2=$(df -B1 --output=size "$MNT" | tail -1)
df -h "$MNT"
[ "$DF2" -gt $((DF1 * 2)) ] || fail "df: $DF2 bytes, not more than twice the $DF1 before"
head -c 40M /dev/urandom > "$MNT/big" && sync -f "$MNT" || fail "write into the new space"
BIGSUM=$(sha256sum < "$MNT/big")
umount "$MNT"
$CLI del "$DEV" || fail "del"
DEV=$(add --key-file "$W/key" "$(table "$NEW" false)") || exit 1
mount -o ro "$DEV" "$MNT" && [ "$(sha256sum < "$MNT/big")" = "$BIGSUM" ] \
    && (cd "$MNT" && sha256sum -c --quiet "$W/sums") || fail "files after re-add"
umount "$MNT"
$CLI del "$DEV" || fail "del"
pass

step check
out=$($CLI check "$W/d.data" "$W/d.meta" --key-file "$W/key") || fail "check exited $?"
echo "$out"
echo "$out" | grep -q "($NEW sectors)" || fail "check does not show $NEW sectors"
pass

step max-sectors
rm -f "$W/d.data" "$W/d.meta"
truncate -s 64M "$W/d.data"
truncate -s 256M "$W/d.meta"       # room for growing to 1 GiB (--max-sectors 2097152)
DEV=$(add --key-file "$W/key" --max-sectors 2097152 "$(table $SECTORS force)") || exit 1
$CLI del "$DEV" || fail "del"
truncate -s 1G "$W/d.data"
NEW=$($CLI resize "$W/d.data" "$W/d.meta" --key-file "$W/key" --sectors 2097152) \
    || fail "resize within --max-sectors exited $?"
[ "$NEW" = 2097152 ] || fail "resize printed $NEW"
[ "$(stat -c %s "$W/d.meta")" = $((256 << 20)) ] || fail "the meta file changed size"
DEV=$(add --key-file "$W/key" "$(table 2097152 false)") || exit 1
[ "$(blockdev --getsz "$DEV")" = 2097152 ] || fail "$DEV is not 1 GiB"
$CLI del "$DEV" || fail "del"
pass

step done
pass

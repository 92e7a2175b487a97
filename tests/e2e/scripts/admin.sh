#!/bin/bash
# Keys, status, check and the rollback anchor (issue 10), end to end, run as root inside the
# VM of tools/vm/run:
#     tools/vm/run -- bash tests/e2e/scripts/admin.sh
# A disk formatted with a key file gets ext4 and a passphrase slot (offline, add-key); it
# opens with either, `status` adds up, `check --data` is clean on the ext4 that was written;
# with --anchor, putting back an older copy of both images is refused (exit 7) until
# --accept-rollback. Every step prints "@@STEP <name> PASS" or "@@STEP <name> FAIL: <why>"
# for tests/e2e/test_admin.py; the first failure stops the run after teardown.
set -u -o pipefail
. "$(dirname "$0")/lib.sh"

W=/var/tmp/sworndisk-e2e-admin
MNT=$W/mnt
DATA_MIB=64
SECTORS=$((DATA_MIB * 2048))
TINY="--pbkdf-memory 1024 --pbkdf-time 1"

cleanup() {
    mountpoint -q "$MNT" && umount "$MNT"
    $CLI del --all --wait 5 >/dev/null 2>&1
    $CLI list
}
trap cleanup EXIT

table() { echo "0 $SECTORS sworndisk $W/d.data $W/d.meta 0 $1"; }
pdev() {         # pdev ARGS...: add with the passphrase on stdin
    local out
    out=$(echo "correct horse" | $CLI add "$@") || fail "add (passphrase) $* exited $?"
    echo "$out"
}

# ------------------------------------------------------------------------------------------
step setup
grep -qw ext4 /proc/filesystems || modprobe ext4 || fail "no ext4 in this kernel"
rm -rf "$W"; mkdir -p "$MNT"
images "$W/d" $DATA_MIB
"$PY" -c "import os; print(os.urandom(32).hex())" > "$W/key"
chmod 600 "$W/key"
pass

step format
DEV=$(add --key-file "$W/key" "$(table force)") || exit 1
mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 "$DEV" || fail "mkfs.ext4"
mount "$DEV" "$MNT" || fail "mount"
head -c 8M /dev/urandom > "$MNT/f1" && sync -f "$MNT" || fail "write f1"
SUM=$(sha256sum < "$MNT/f1")
pass

step status
$CLI status "$DEV" || fail "status exited $?"
"$PY" - "$($CLI status -n "$(devnum "$DEV")" --json)" <<'PYEOF' || fail "status does not add up"
import json, sys
s = json.loads(sys.argv[1])
assert s["used"] + s["free"] == s["usable"] and s["used"] >= 8 << 20, s
assert s["key_slot"] == 0 and s["key_bits"] == 128 and s["write_amplification"] > 0, s
PYEOF
umount "$MNT"
$CLI del "$DEV" || fail "del $DEV"
pass

step add-key
slot=$(echo "correct horse" | $CLI add-key "$W/d.meta" --key-file "$W/key" $TINY) || fail "add-key"
[ "$slot" = 1 ] || fail "add-key printed '$slot'"
$CLI dump "$W/d.meta" | grep -q "1: passphrase, argon2id: 1024 KiB, 1 passes" || fail "dump"
DEV=$(pdev "$(table false)") || exit 1
[ "$($CLI status "$DEV" --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["key_slot"])')" = 1 ] \
    || fail "status does not show slot 1"
mount "$DEV" "$MNT" && [ "$(sha256sum < "$MNT/f1")" = "$SUM" ] || fail "f1 through slot 1"
umount "$MNT"
$CLI del "$DEV" || fail "del"
pass

step check
echo "correct horse" | $CLI check "$W/d.data" "$W/d.meta" --data || fail "check exited $?"
pass

step anchor
out=$($CLI add --key-file "$W/key" --anchor "$W/anchor" "$(table false)" 2>&1) \
    && fail "a missing anchor was accepted"
echo "$out" | grep -q "anchor $W/anchor is missing" || fail "no missing-anchor error: $out"
DEV=$(add --key-file "$W/key" --anchor "$W/anchor" --accept-rollback "$(table false)") || exit 1
$CLI del "$DEV" || fail "del"
cp "$W/d.data" "$W/old.data" && cp "$W/d.meta" "$W/old.meta" || fail "snapshot"
DEV=$(add --key-file "$W/key" --anchor "$W/anchor" "$(table false)") || exit 1
mount "$DEV" "$MNT" && head -c 1M /dev/urandom > "$MNT/f2" && sync -f "$MNT" || fail "write f2"
umount "$MNT"
$CLI del "$DEV" || fail "del"
cp "$W/old.data" "$W/d.data" && cp "$W/old.meta" "$W/d.meta" || fail "roll back"
out=$($CLI add --key-file "$W/key" --anchor "$W/anchor" "$(table false)" 2>&1); rc=$?
echo "$out"
[ "$rc" = 7 ] || fail "a rolled-back disk: exit $rc, expected 7"
echo "$out" | grep -q "was rolled back: its last commit is [0-9]*, its anchor says [0-9]*" \
    || fail "no sequence numbers in '$out'"
DEV=$(add --key-file "$W/key" --anchor "$W/anchor" --accept-rollback "$(table false)") || exit 1
mount "$DEV" "$MNT" && [ ! -e "$MNT/f2" ] && [ "$(sha256sum < "$MNT/f1")" = "$SUM" ] \
    || fail "the accepted state is not the old one"
umount "$MNT"
$CLI del "$DEV" || fail "del"
pass

step done
pass

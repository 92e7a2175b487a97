#!/bin/bash
# Crypto workers in the ublk server (issue 15), run as root inside the VM of tools/vm/run:
#     tools/vm/run -- bash tests/e2e/scripts/pool.sh
# A disk added with --crypto-workers 1 --queues 2 takes fio write+verify from two jobs;
# status and stats show the pool doing the crypto; a bad --crypto-workers is one line.
# Then the same on block devices (--disk 64M --disk 32M: /dev/vdb, /dev/vdc), where
# O_DIRECT lets the workers read the data device themselves (fetch jobs).
set -u -o pipefail
. "$(dirname "$0")/lib.sh"
W=/var/tmp/sworndisk-e2e-pool
DATA_MIB=64
cleanup() { $CLI del --all --wait 5 >/dev/null 2>&1; }
trap cleanup EXIT

step setup
rm -rf "$W"; mkdir -p "$W"
images "$W/c" $DATA_MIB
"$PY" -c "import os; print(os.urandom(32).hex())" > "$W/key"; chmod 600 "$W/key"
TABLE="0 $((DATA_MIB * 2048)) sworndisk $W/c.data $W/c.meta 0 force"
pass

step flag
out=$($CLI add --key-file "$W/key" --crypto-workers x "$TABLE" 2>&1) && fail "bad --crypto-workers accepted"
echo "$out" | grep -q "error: argument --crypto-workers: not a number" || fail "no one-line error: $out"
pass

step fio
DEV=$(add --key-file "$W/key" --crypto-workers 1 --queues 2 "$TABLE") || exit 1
N=$(devnum "$DEV")
fio --name=pool --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=16 --numjobs=2 \
    --rw=randwrite --bs=4k --size=8M --offset_increment=8M --fsync=32 --verify=crc32c \
    --do_verify=1 --verify_fatal=1 --randrepeat=1 --group_reporting \
    --output-format=terse >/dev/null || fail "fio write+verify with 2 queues and a worker failed"
pass

step status
$CLI status -n "$N" | tee "$W/status" | grep -q "crypto: .*1 worker process, 0 restarted" \
    || fail "status does not show the pool: $(cat "$W/status")"
$CLI stats -n "$N" --json | "$PY" -c "
import json, sys
c = json.load(sys.stdin)['crypto']
print(c)
sys.exit(not (c['workers'] == 1 and len(c['worker_pids']) == 1 and c['blocks_in_workers'] > 0))" \
    || fail "stats do not show the worker doing the crypto"
$CLI del -n "$N" || fail "del"
pass

step fetch
[ -b /dev/vdb ] && [ -b /dev/vdc ] || fail "the VM has no /dev/vdb and /dev/vdc (--disk 64M --disk 32M)"
DEV=$(add --key-file "$W/key" --crypto-workers 1 --queues 2 \
      "0 $((64 * 2048)) sworndisk /dev/vdb /dev/vdc 0 force") || exit 1
N=$(devnum "$DEV")
# Written and flushed first, then read back alone: with no write pending, the read
# batches of more than 8 requests go to the workers whole.
FIO="fio --name=fetch --filename=$DEV --direct=1 --ioengine=libaio --iodepth=32 --rw=randwrite
     --bs=4k --size=16M --verify=crc32c --randrepeat=1 --output-format=terse"
$FIO --do_verify=0 --end_fsync=1 >/dev/null || fail "fio write on block devices failed"
$FIO --verify_only=1 --verify_fatal=1 >/dev/null || fail "fio verify through the workers failed"
$CLI stats -n "$N" --json | "$PY" -c "
import json, sys
c = json.load(sys.stdin)['crypto']
print(c)
sys.exit(not c['blocks_fetched'] > 0)" || fail "the workers read no block themselves"
$CLI del -n "$N" || fail "del"
pass

step done
pass

#!/bin/sh
# fio on the three ublk targets in one boot: null (the shim alone), loop (shim + O_DIRECT
# file I/O) and sworndisk (shim + engine), so the figures share one kernel and one machine.
#
#   tools/vm/run --disk 256M --disk 256M --disk 128M -- sh tools/fio/compare.sh
#
# /dev/vdb backs the loop target; /dev/vdc and /dev/vdd are SwornDisk's data and meta.
# Prints one "TABLE <target> <job> <IOPS> <MiB/s>" line per job, then a table.
set -eu
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
RUNTIME=${FIO_RUNTIME:-4}
WORK=$(mktemp -d)
OUT=$WORK/table
: >"$OUT"
[ -e /dev/ublk-control ] || modprobe ublk_drv

jobs() {   # jobs TARGET DEV
    for spec in "randwrite 4k" "randread 4k" "write 1m" "read 1m"; do
        set -- "$1" "$2" $spec
        fio --name="$3-$4" --filename="$2" --direct=1 --ioengine=libaio --iodepth=16 \
            --rw="$3" --bs="$4" --size=64m --runtime="$RUNTIME" --time_based \
            --output-format=terse --terse-version=3 >"$WORK/fio.out"
        # terse v3: field 8 read IOPS, 7 read KiB/s; 49 write IOPS, 48 write KiB/s
        awk -F';' -v t="$1" -v j="$3-$4" '{ r = ($8 > 0) ? $8 : $49; b = ($7 > 0) ? $7 : $48;
            printf "TABLE %s %s %d %.1f\n", t, j, r, b / 1024 }' "$WORK/fio.out" | tee -a "$OUT"
        set -- "$1" "$2"
    done
}

serve() {  # serve NAME ARGS...: background shim runner, waits for its device
    name=$1; shift
    $PY -m ublk_shim "$@" >"$WORK/$name.out" 2>&1 &
    PID=$!
    until grep -q '^/dev/ublkb' "$WORK/$name.out"; do sleep 0.2; done
    DEV=$(head -n 1 "$WORK/$name.out")
}

echo "kernel $(uname -r)"
serve null null --size 256M; jobs null "$DEV"; kill -TERM $PID; wait $PID
serve loop loop /dev/vdb;     jobs loop "$DEV"; kill -TERM $PID; wait $PID

head -c 32 /dev/urandom >"$WORK/key"
SECTORS=$($PY -c 'from sworndisk import SwornDisk; print(SwornDisk.usable_blocks(256 << 20) * 8)')
DEV=$(.venv/bin/sworndisk-ublk add --key-file "$WORK/key" "0 $SECTORS sworndisk /dev/vdc /dev/vdd 0 force")
jobs sworndisk "$DEV"
.venv/bin/sworndisk-ublk del --all

echo
echo "target     job            IOPS    MiB/s"
awk '{ printf "%-10s %-12s %7d %8.1f\n", $2, $3, $4, $5 }' "$OUT"
rm -rf "$WORK"

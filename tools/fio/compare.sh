#!/bin/sh
# fio on every ublk target and on dm-crypt, at depth 1 and 16, in one boot: null (the shim
# alone), loop (shim + O_DIRECT file I/O), sworndisk (shim + engine) and, where the kernel
# can load dm_crypt, dm-crypt (aes-xts-plain64, 4 KiB sectors, crypto inline rather than in
# kcryptd workqueues) as the kernel baseline.
# TCG distorts absolute figures, so the script reports ratios taken within this one boot:
# every device is set up first, then each job runs on all of them back to back, so that a
# change of load on the host shifts a whole row rather than one target.
#
#   tools/vm/run --disk 256M --disk 256M --disk 128M --disk 256M -- sh tools/fio/compare.sh
#
# Disks: /dev/vdb backs loop, /dev/vdc and /dev/vdd are SwornDisk's data and meta, /dev/vde
# is under dm-crypt, /dev/vdf backs loop_ref, /dev/vdg and /dev/vdh are the data and meta of
# sworndisk0 (the engine with --crypto-workers 0, against the default workers of sworndisk):
#
#   tools/vm/run --disk 256M --disk 256M --disk 128M --disk 256M --disk 4K --disk 256M \
#       --disk 128M -- env COMPARE_TARGETS="sworndisk sworndisk0" COMPARE_DEPTHS="32" \
#       sh tools/fio/compare.sh Environment (set it in the guest:
# `-- env FIO_RUNTIME=8 sh ...`): COMPARE_TARGETS (default "null loop sworndisk dmcrypt"),
# COMPARE_DEPTHS ("1 16"), FIO_RUNTIME (seconds per job, 4), FIO_SIZE (region, 64m),
# COMPARE_REF: another checkout whose shim serves the targets null_ref and loop_ref, for a
# before/after in one boot:
#
#   mkdir /tmp/ref && git archive REV | tar -x -C /tmp/ref   # the shim is stdlib only
#   tools/vm/run --disk 256M --disk 256M --disk 128M --disk 256M --disk 256M -- env \
#       COMPARE_REF=/tmp/ref COMPARE_TARGETS="null null_ref loop loop_ref dmcrypt" \
#       sh tools/fio/compare.sh
#
# Prints "TABLE <target> <job> <depth> <IOPS> <MiB/s>" per job as it runs, then the tables:
# IOPS, each target / dm-crypt, each target's depth-16 / depth-1 and, with COMPARE_REF,
# X / X_ref. A target that cannot be set up prints "FAILED <target>: <why>"; the others
# still run and the exit status is 1.
set -u
cd "$(dirname "$0")/../.."
PY=$PWD/.venv/bin/python
REF=${COMPARE_REF:-}
TARGETS=${COMPARE_TARGETS:-null loop sworndisk dmcrypt}
DEPTHS=${COMPARE_DEPTHS:-1 16}
RUNTIME=${FIO_RUNTIME:-4}
SIZE=${FIO_SIZE:-64m}
WORK=$(mktemp -d)
OUT=$WORK/table
: >"$OUT"
STATUS=0
LIVE=                      # "target=device" for every target set up
[ -e /dev/ublk-control ] || modprobe ublk_drv

failed() { echo "FAILED $*"; STATUS=1; }

fio_job() {   # fio_job TARGET DEV RW BS DEPTH: one measured job, appended to $OUT
    fio --name="$3-$4" --filename="$2" --direct=1 --ioengine=libaio --iodepth="$5" \
        --rw="$3" --bs="$4" --size="$SIZE" --runtime="$RUNTIME" --time_based \
        --randrepeat=1 --output-format=terse --terse-version=3 >"$WORK/fio.out" 2>&1 \
        || { cat "$WORK/fio.out"; return 1; }
    # terse v3: field 8 read IOPS, 7 read KiB/s; 49 write IOPS, 48 write KiB/s
    awk -F';' -v t="$1" -v j="$3-$4" -v d="$5" '{ r = ($8 > 0) ? $8 : $49;
        b = ($7 > 0) ? $7 : $48; printf "TABLE %s %s %s %d %.1f\n", t, j, d, r, b / 1024 }' \
        "$WORK/fio.out" | tee -a "$OUT"
}

prefill() {   # prefill DEV: write the region once, so that reads read written blocks
    fio --name=prefill --filename="$1" --direct=1 --ioengine=libaio --iodepth=16 --rw=write \
        --bs=1m --size="$SIZE" --end_fsync=1 >"$WORK/fio.out" 2>&1 \
        || { cat "$WORK/fio.out"; return 1; }
}

serve() {     # serve NAME DIR ARGS...: background `python -m ublk_shim ARGS` with DIR's shim;
    name=$1; dir=$2; shift 2               # prints the device
    [ -d "$dir/ublk_shim" ] || { echo "no ublk_shim in '$dir' (COMPARE_REF?)" >&2; return 1; }
    (cd "$dir" && exec "$PY" -m ublk_shim "$@") >"$WORK/$name.out" 2>&1 &
    echo $! >"$WORK/$name.pid"
    i=0
    until grep -q '^/dev/ublkb' "$WORK/$name.out"; do
        kill -0 $! 2>/dev/null || { cat "$WORK/$name.out" >&2; return 1; }
        i=$((i + 1)); [ $i -lt 300 ] || return 1
        sleep 0.2
    done
    head -n 1 "$WORK/$name.out"
}

unserve() {   # unserve NAME: SIGTERM the server, show its stats line (batch sizes)
    pid=$(cat "$WORK/$1.pid"); kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done    # not our child: no `wait`
    grep 'stats:' "$WORK/$1.out" | sed "s/^/$1 /"
}

up_null() { serve null . null --size 256M; }
up_loop() { serve loop . loop /dev/vdb; }
up_null_ref() { serve null_ref "$REF" null --size 256M; }
up_loop_ref() { serve loop_ref "$REF" loop /dev/vdf; }

add_sworndisk() {   # add_sworndisk NAME DATA META [ADD ARGS...]: a SwornDisk on two disks
    name=$1; data=$2; meta=$3; shift 3
    head -c 32 /dev/urandom >"$WORK/$name.key"
    sectors=$($PY -c 'import sys; from sworndisk import SwornDisk
print(SwornDisk.usable_blocks(int(sys.argv[1])) * 8)' "$(blockdev --getsize64 "$data")") \
        || return 1
    .venv/bin/sworndisk-ublk add --key-file "$WORK/$name.key" "$@" \
        "0 $sectors sworndisk $data $meta 0 force" >"$WORK/$name.dev" 2>"$WORK/$name.err" \
        || { cat "$WORK/$name.err" >&2; return 1; }
    cat "$WORK/$name.dev"
}
up_sworndisk() { add_sworndisk sworndisk /dev/vdc /dev/vdd; }
down_sworndisk() { .venv/bin/sworndisk-ublk del "$(cat "$WORK/sworndisk.dev")"; }
# The same engine with its crypto in the queue thread, for a same-boot workers/no-workers ratio.
up_sworndisk0() { add_sworndisk sworndisk0 /dev/vdg /dev/vdh --crypto-workers 0; }
down_sworndisk0() { .venv/bin/sworndisk-ublk del "$(cat "$WORK/sworndisk0.dev")"; }

up_dmcrypt() {
    modprobe dm_crypt 2>"$WORK/modprobe.err" \
        || { echo "SKIP dmcrypt: cannot load dm_crypt: $(cat "$WORK/modprobe.err")" >&2; return 2; }
    key=$(head -c 64 /dev/urandom | od -An -tx1 | tr -d ' \n')
    # Inline crypto: through kcryptd's workqueues a depth-1 job swings 10x from boot to boot
    # under TCG (e.g. 2300 vs 205 IOPS), with it the figures are steady.
    echo "0 $(blockdev --getsz /dev/vde) crypt aes-xts-plain64 $key 0 /dev/vde 0 3" \
         "sector_size:4096 no_read_workqueue no_write_workqueue" \
        | dmsetup --noudevsync create sdcompare || return 1
    echo "/dev/dm-$(dmsetup info -c --noheadings -o minor sdcompare | tr -d ' ')"
}
down_dmcrypt() { dmsetup --noudevsync remove sdcompare; }

echo "kernel $(uname -r), $(nproc) CPUs, depths $DEPTHS, ${RUNTIME}s per job, region $SIZE"
for target in $TARGETS; do
    dev=$("up_$target"); r=$?
    if [ $r -eq 0 ] && prefill "$dev"; then
        LIVE="$LIVE $target=$dev"
    elif [ $r -ne 2 ]; then
        failed "$target: could not be set up"
    fi
done
for depth in $DEPTHS; do
    for spec in "randwrite 4k" "randread 4k" "write 1m" "read 1m"; do
        for live in $LIVE; do
            # shellcheck disable=SC2086
            fio_job "${live%%=*}" "${live#*=}" $spec "$depth" || failed "${live%%=*}: fio $spec"
        done
    done
done
for live in $LIVE; do
    name=${live%%=*}
    if [ -e "$WORK/$name.pid" ]; then unserve "$name"; else "down_$name"; fi \
        || failed "$name: teardown"
done

# The tables: IOPS; target / dmcrypt at the same job and depth; depth N / depth 1; X / X_ref.
awk -v targets="$TARGETS" '
    { iops[$2, $3, $4] = $5; if (!(($3, $4) in seen)) { seen[$3, $4] = 1; rows[++n] = $3 " " $4 } }
    function header(title) {
        printf "\n%s\n%-13s %5s", title, "job", "depth"
        for (i = 1; i <= nt; i++) printf " %10s", t[i]
        printf "\n"
    }
    END {
        nt = split(targets, t, " ")
        header("IOPS")
        for (r = 1; r <= n; r++) {
            split(rows[r], k, " "); printf "%-13s %5s", k[1], k[2]
            for (i = 1; i <= nt; i++) printf " %10s", ((t[i], k[1], k[2]) in iops) ? iops[t[i], k[1], k[2]] : "-"
            printf "\n"
        }
        header("target / dmcrypt (same job and depth)")
        for (r = 1; r <= n; r++) {
            split(rows[r], k, " "); printf "%-13s %5s", k[1], k[2]; base = iops["dmcrypt", k[1], k[2]]
            for (i = 1; i <= nt; i++) {
                v = iops[t[i], k[1], k[2]]
                if (base > 0 && v != "") printf " %10.3f", v / base; else printf " %10s", "-"
            }
            printf "\n"
        }
        header("depth N / depth 1 (same target and job)")
        for (r = 1; r <= n; r++) {
            split(rows[r], k, " "); if (k[2] == 1) continue; printf "%-13s %5s", k[1], k[2]
            for (i = 1; i <= nt; i++) {
                v = iops[t[i], k[1], k[2]]; one = iops[t[i], k[1], 1]
                if (one > 0 && v != "") printf " %10.2f", v / one; else printf " %10s", "-"
            }
            printf "\n"
        }
        for (i = 1; i <= nt; i++) if (t[i] ~ /_ref$/) refs = 1
        if (!refs) exit
        header("X / X_ref (same job and depth)")
        for (r = 1; r <= n; r++) {
            split(rows[r], k, " "); printf "%-13s %5s", k[1], k[2]
            for (i = 1; i <= nt; i++) {
                v = iops[t[i], k[1], k[2]]; ref = iops[t[i] "_ref", k[1], k[2]]
                if (ref > 0 && v != "") printf " %10.2f", v / ref; else printf " %10s", "-"
            }
            printf "\n"
        }
    }' "$OUT"
rm -rf "$WORK"
exit $STATUS

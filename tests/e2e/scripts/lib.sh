# Shared by the step scripts that run in the VM (source it: . "$(dirname "$0")/lib.sh").
# Sets REPO (and cds there), PY and CLI; each step prints "@@STEP <name> PASS" or
# "@@STEP <name> FAIL: <why>", which tests/e2e/steps.py reads.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$REPO" || exit 1
PY=${SWORNDISK_PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3
CLI="$PY -m sworndisk_ublk"

log() { echo "---- $*"; }
fail() { echo "@@STEP $STEP FAIL: $*" >&2; exit 1; }
pass() { echo "@@STEP $STEP PASS"; }
step() { STEP=$1; log "step $STEP"; }
devnum() { echo "${1#/dev/ublkb}"; }
add() {          # add ARGS...: device path on stdout, fails the step otherwise
    local out
    out=$($CLI add "$@") || fail "add $* exited $?"
    case "$out" in /dev/ublkb*) echo "$out" ;; *) fail "add printed '$out'" ;; esac
}
images() {       # images PREFIX MIB: PREFIX.data of MIB MiB, PREFIX.meta of the minimum size
    truncate -s "$2M" "$1.data" || fail "cannot create $1.data"
    "$PY" - "$1.meta" $(($2 << 20)) <<'EOF' || fail "cannot size $1.meta"
import sys
from sworndisk import SwornDisk
n = SwornDisk.min_meta_size(int(sys.argv[2]), int(sys.argv[2]) // 4096)
open(sys.argv[1], "wb").truncate(-(-n // (1 << 20)) << 20)
EOF
}

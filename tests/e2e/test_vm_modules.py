"""The VM's kernel loads modules on demand, as a normal system does (tools/vm/init).

The kernel runs its modprobe helper in PID 1's root (the initramfs), not in the guest's
chroot; without the helper tools/vm installs, `mount /dev/ublkbN` failed until someone ran
`modprobe ext4`, and dm-crypt could not find xts(aes). One boot checks both.
"""
import pytest

pytestmark = pytest.mark.e2e

GUEST = r"""
set -u
echo "helper=$(cat /proc/sys/kernel/modprobe)"
grep -qw ext4 /proc/filesystems && echo "ext4-before=loaded" || echo "ext4-before=absent"
mkfs.ext4 -q -F /dev/vdb && mkdir -p /tmp/m && mount /dev/vdb /tmp/m && echo "mount=ok"
grep -qw ext4 /proc/filesystems && echo "ext4-after=loaded"
umount /tmp/m
grep -q '^name *: xts(aes)' /proc/crypto && echo "xts-before=loaded" || echo "xts-before=absent"
modprobe dm_crypt
key=$(head -c 64 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "0 $(blockdev --getsz /dev/vdc) crypt aes-xts-plain64 $key 0 /dev/vdc 0 1 sector_size:4096" \
    | dmsetup --noudevsync create autoload && echo "dm-crypt=ok"
dmsetup --noudevsync remove autoload
"""


def test_modules_autoload(vm_run):
    done = vm_run("sh", "-c", GUEST, disks=("32M", "32M"), timeout=300)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, f"stdout: {done.stdout}\nstderr: {done.stderr}"
    assert "helper=/bin/modprobe-newroot" in lines
    # Not loaded at boot, so the mount below really needed the kernel to load it.
    assert "ext4-before=absent" in lines and "xts-before=absent" in lines
    assert "mount=ok" in lines and "ext4-after=loaded" in lines, done.stdout
    assert "dm-crypt=ok" in lines, done.stdout

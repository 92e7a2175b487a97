"""Growing a disk offline onto larger devices (`sworndisk-ublk resize`).

After the data device (and, if need be, the meta device) was made larger, grow() gives
the disk the new data segments and a larger logical size. The new layout is computed by
layout.grown(); what changes on disk is docs/format.md's "Resize":

- when the checkpoint slots, the journal and the segment table have room for the new
  size (as `--max-sectors` reserves at format), only the superblock changes: packs
  written before name fewer segments and index chunks, and the others are empty;
- otherwise those three regions move behind everything the current layout uses: the
  disk is opened (recovered), checkpointed, its segment-table blocks copied and a pack
  written into the new regions (protocol.CommitProtocol.move_to), all outside the
  current layout.

Either way the resize is committed by rewriting the two superblock copies, one at a
time, with the new layout and a higher generation: a power cut at any device call
leaves the disk as it was or as resized, and nothing flushed is lost. Shrinking is
refused, never attempted; a disk in use is refused as busy (its devices are locked as
the engine locks them).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Union

from . import superblock as sbmod
from .device import BlockDevice, open_pair
from .format import BLOCK_SIZE
from .layout import grown
from .superblock import Credential

Dev = Union[str, BlockDevice]


@dataclass(frozen=True)
class GrowResult:
    """The sizes before and after (4 KiB blocks), and whether meta regions moved."""
    old_nr_blocks: int
    nr_blocks: int                 # the logical size now
    old_data_blocks: int
    data_blocks: int               # data device blocks in use now
    old_meta_blocks: int
    meta_blocks: int
    moved: bool                    # the checkpoint slots, journal and segment table moved
    changed: bool                  # False: the disk already had this size

    @property
    def sectors(self) -> int:
        return self.nr_blocks * (BLOCK_SIZE // 512)

    def as_dict(self) -> dict:
        return dict(asdict(self), sectors=self.sectors)


def grow(data: Dev, meta: Dev, *, key=None, passphrase=None,
         nr_blocks: int | None = None) -> GrowResult:
    """Grows the closed disk on `data` and `meta` to `nr_blocks` (default: what the data
    device now allows, as at format, and never less than now); see the module docstring.

    InvalidArgument for a shrink, MetaTooSmall (with .needed bytes) when the meta device
    is too small, DeviceBusyError when the disk is in use; nothing changes then."""
    from .disk import SwornDisk
    cred = Credential.of(key, passphrase)
    d, m, owned = open_pair(data, meta)
    try:
        blocks = sbmod.read_copies(m)
        un = sbmod.unlock(blocks, cred)
        sb = un.superblock
        old = sb.layout
        new = grown(old, sb.config, d.size, m.size, nr_blocks)
        moved = new.checkpoint_start != old.checkpoint_start
        if new != old:
            # Open (recover) on the current layout: a disk that does not open is not
            # resized; with moved regions, its state is written into them.
            disk = SwornDisk._open(d, m, lambda _blocks: un)
            if moved:
                disk.move_regions(new)
            else:
                disk.close()
        if new != old or len({sbmod.parse(b, i).generation for i, b in enumerate(blocks)}) > 1:
            # The commit point (and the completion of one interrupted before).
            sbmod.write_copies(m, (sb.next(layout=new) if new != old else sb).encode(un.master))
        return GrowResult(old.nr_blocks, new.nr_blocks, old.data_blocks, new.data_blocks,
                          old.meta_blocks, new.meta_blocks, moved, new != old)
    finally:
        for dev in owned:
            dev.close()


__all__ = ["GrowResult", "grow"]

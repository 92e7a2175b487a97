"""ublk_shim: a pure-Python (ctypes) ublk server: io_uring, the ublk driver, and targets.

    from ublk_shim import Target, Request, UblkServer, NullTarget, LoopTarget
    from ublk_shim import UblkError, DriverMissing, NotRoot
    from ublk_shim import ctrl      # list_devices(), get_dev_info(), stop_device(), ...

Layout (after libublk-rs): `sys` raw UAPI, `uring` the io_uring binding, `ctrl` the control
plane, `queue` the data plane, `target` the Target interface and reference targets,
`server` the device lifecycle; host plumbing shared with the engine and the CLI: `blockio`
(block I/O on a file or block device), `holders` (who uses a device). See docs/ublk_shim.md.
"""
from . import ctrl
from .ctrl import DeviceParams, DevInfo
from .errors import DriverMissing, NotRoot, UblkError
from .server import UblkServer
from .target import (OP_DISCARD, OP_FLUSH, OP_READ, OP_WRITE, OP_WRITE_ZEROES, LoopTarget,
                     NullTarget, Request, Target)

__all__ = [
    "Target", "Request", "UblkServer", "NullTarget", "LoopTarget",
    "UblkError", "DriverMissing", "NotRoot", "ctrl", "DevInfo", "DeviceParams",
    "OP_READ", "OP_WRITE", "OP_FLUSH", "OP_DISCARD", "OP_WRITE_ZEROES",
]

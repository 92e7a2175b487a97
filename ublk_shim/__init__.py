"""ublk_shim: a pure-Python (ctypes) ublk server: io_uring, the ublk driver, and targets.

    from ublk_shim import Target, Request, UblkServer, NullTarget, LoopTarget
    from ublk_shim import UblkError, DriverMissing, NotRoot
    from ublk_shim import ctrl      # list_devices(), get_dev_info(), stop_device(), ...

Layout (after libublk-rs): `sys` raw UAPI, `uring` the io_uring binding, `ctrl` the control
plane, `queue` the data plane, `target` the Target interface and reference targets,
`server` the device lifecycle; host plumbing shared with the engine and the CLI: `blockio`
(block I/O on a file or block device), `holders` (who uses a device). See docs/ublk_shim.md.
"""
# Names are imported on first use (PEP 562): a process that needs one part (a crypto
# worker needs `uring` alone) does not load the control and data planes with it.
_EXPORTS = {
    "ctrl": ".ctrl", "DeviceParams": ".ctrl", "DevInfo": ".ctrl",
    "DriverMissing": ".errors", "NotRoot": ".errors", "UblkError": ".errors",
    "UblkServer": ".server",
    "OP_DISCARD": ".target", "OP_FLUSH": ".target", "OP_READ": ".target",
    "OP_WRITE": ".target", "OP_WRITE_ZEROES": ".target", "LoopTarget": ".target",
    "NullTarget": ".target", "Request": ".target", "Target": ".target",
}

__all__ = [
    "Target", "Request", "UblkServer", "NullTarget", "LoopTarget",
    "UblkError", "DriverMissing", "NotRoot", "ctrl", "DevInfo", "DeviceParams",
    "OP_READ", "OP_WRITE", "OP_FLUSH", "OP_DISCARD", "OP_WRITE_ZEROES",
]


def __getattr__(name: str):
    import importlib
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module 'ublk_shim' has no attribute {name!r}")
    module = importlib.import_module(where, __name__)
    value = module if name == where[1:] else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))

"""Errors the CLI reports as one line, and the exit codes they map to.

Everything a user can get wrong (a bad table, a missing file, the wrong key, no driver,
not root, a busy device) is raised as a CliError somewhere below the CLI; `cli.main`
prints it as ``sworndisk-ublk: error: <message>`` and exits with its code, never with a
traceback.  The codes follow the spirit of cryptsetup(8): a script can tell "wrong key"
from "device busy" without parsing the message.
"""
from __future__ import annotations

import enum
import errno

import sworndisk.errors as se
from ublk_shim import DriverMissing, NotRoot, UblkError


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1          # the operation failed (server died, timeout, kernel error)
    USAGE = 2           # bad arguments or a bad table (argparse uses 2 as well)
    KEY = 3             # wrong key, or metadata that fails to verify
    NOT_FOUND = 4       # a file, device, driver or state entry does not exist
    BUSY = 5            # a device is in use
    PERMISSION = 6      # not root
    ROLLBACK = 7        # the disk is older than its anchor, or the anchor cannot vouch
    CHECK_FAILED = 8    # check could not run (fsck's 8; check's 4 is "problems found")


class CliError(Exception):
    """A user-facing failure: `message` is one line, safe to print (never holds a key)."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILED):
        super().__init__(message)
        self.message = message
        self.code = ExitCode(code)

    def __str__(self) -> str:
        return self.message


_ERRNO_CODES = {
    errno.ENOENT: ExitCode.NOT_FOUND, errno.ENODEV: ExitCode.NOT_FOUND,
    errno.ENXIO: ExitCode.NOT_FOUND, errno.EBUSY: ExitCode.BUSY, errno.EEXIST: ExitCode.BUSY,
    errno.EACCES: ExitCode.PERMISSION, errno.EPERM: ExitCode.PERMISSION,
}


def to_cli_error(exc: BaseException, meta: str = "the meta device") -> CliError:
    """Translate an engine, shim or OS exception into the one-line error a user sees."""
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, se.DeviceBusyError):       # names the device and its holder
        return CliError(str(exc), ExitCode.BUSY)
    if isinstance(exc, se.KeyKindError):
        return CliError(f"{meta}: {exc}", ExitCode.KEY)
    if isinstance(exc, se.WrongKeyError):
        return CliError(f"wrong key for the SwornDisk on {meta}: {exc}", ExitCode.KEY)
    if isinstance(exc, se.AnchorError):
        return CliError(f"{exc}; the SwornDisk on {meta} was not opened (--accept-rollback "
                        f"opens it as it is and writes a new anchor)", ExitCode.ROLLBACK)
    if isinstance(exc, se.RollbackError):
        return CliError(f"the SwornDisk on {meta} was rolled back: its last commit is "
                        f"{exc.disk_seq}, its anchor says {exc.anchor_seq}; it was not opened "
                        f"(--accept-rollback opens it as it is)", ExitCode.ROLLBACK)
    if isinstance(exc, se.NotFormattedError):
        return CliError(f"{meta} holds no SwornDisk; use <format> true or force in the "
                        f"table to create one", ExitCode.NOT_FOUND)
    if isinstance(exc, se.IntegrityError):
        return CliError(f"the SwornDisk on {meta} failed to verify ({exc}): tampered with or "
                        f"corrupted; it was not formatted", ExitCode.KEY)
    if isinstance(exc, (se.InvalidArgument, se.SwornDiskError)) and not isinstance(exc, OSError):
        return CliError(str(exc), ExitCode.USAGE if isinstance(exc, ValueError)
                        else ExitCode.FAILED)
    shim_error = _shim_error(exc)
    if shim_error is not None:
        return shim_error
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        text = exc.strerror or str(exc)
        return CliError(f"{where}{text}", _ERRNO_CODES.get(exc.errno or 0, ExitCode.FAILED))
    return CliError(f"{type(exc).__name__}: {exc}", ExitCode.FAILED)


def _shim_error(exc: BaseException) -> "CliError | None":
    if isinstance(exc, DriverMissing):
        return CliError(str(exc), ExitCode.NOT_FOUND)
    if isinstance(exc, NotRoot):            # one message for every refusal of root rights
        return CliError(str(NotRoot()), ExitCode.PERMISSION)
    if isinstance(exc, UblkError):
        return CliError(str(exc), _ERRNO_CODES.get(exc.errno or 0, ExitCode.FAILED))
    return None

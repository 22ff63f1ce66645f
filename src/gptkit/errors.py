"""The one exception type users see: a one-line message naming the problem and the fix."""

import errno


class GptkitError(Exception):
    """Bad input or state detected at a boundary; the CLI prints it as one line and exits 2."""


_ADVICE = {
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions and attributes (chattr)",
    errno.EROFS: "the file system is read-only; choose a writable place",
    errno.ENOSPC: "free space on the device",
    errno.EDQUOT: "free space or raise the disk quota",
    errno.EFBIG: "raise the file size limit (ulimit -f)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder; name a file",
    errno.ENOENT: "check the path",
}


def describe_os_error(e: OSError, doing: str = "access") -> str:
    """An OSError as one line naming the path and the cause, e.g. "cannot write 'runs/x/config.yaml':
    Permission denied; check its permissions" (the CLI's last resort: no traceback for a system error)."""
    where = f" {str(e.filename)!r}" if e.filename is not None else ""
    cause = e.strerror or str(e) or type(e).__name__
    advice = _ADVICE.get(e.errno or 0)
    return f"cannot {doing}{where}: {cause}" + (f"; {advice}" if advice else "")


def os_error(e: OSError, doing: str = "access") -> GptkitError:
    return GptkitError(describe_os_error(e, doing))

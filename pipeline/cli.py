"""How every job ends on an error its user can fix: one line on stderr and a fixed exit status,
never a traceback. An error not listed here is a bug and keeps its traceback (exit status 1).
"""

import errno
import sys

from pipeline.config import ConfigError
from pipeline.storage import StorageError

OK, CRASH, USAGE, STORAGE, CHECK = 0, 1, 2, 3, 4
EXIT_STATUS = """Exit status (the same for every job):
  0  done
  1  unexpected crash (a bug: the traceback says where)
  2  bad arguments, config (key, value, --config file), model or input path: fix the command
  3  storage or machine: S3 unreachable, silent or refusing (credentials), permission denied, disk full
  4  the job ran and its result fails a check it was asked for (--strict, a promotion gate,
     nothing could be translated)
"""
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def error_status(exc: BaseException) -> tuple[int, str] | None:
    """(exit status, one-line message) for an error a user can fix, None for anything else. A
    StorageError raised in a Ray worker arrives wrapped, so the causes are searched too."""
    for cause in _causes(exc):
        if isinstance(cause, StorageError):
            return STORAGE, str(cause)
    if isinstance(exc, ConfigError):
        return USAGE, str(exc)
    if isinstance(exc, PermissionError):
        return STORAGE, f"permission denied: {exc.filename or exc}"
    if isinstance(exc, OSError) and exc.errno in FULL_DISK:
        return STORAGE, f"no space left on the device writing {exc.filename or '(unknown file)'}"
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return USAGE, f"no such file or folder: {exc.filename}"
    return None


def _causes(exc: BaseException, depth: int = 8):
    while exc is not None and depth:
        yield exc
        exc, depth = exc.__cause__ or exc.__context__, depth - 1


def run(job, *args) -> int:
    """`job(*args)`'s exit status; a user-fixable error (error_status) becomes its line and status."""
    try:
        return job(*args)
    except Exception as exc:  # only the known kinds are handled; the rest re-raised as they were
        known = error_status(exc)
        if known is None:
            raise
        status, message = known
        print(f"error: {message}", file=sys.stderr)
        return status

"""Writing files inside stores and run folders that others may share: never through a link.

In a group-shared store or run folder anyone with write access may plant a symbolic link (to
~/.bashrc, say) where this project writes, or a FIFO or device. `open_regular` opens with
O_NOFOLLOW and refuses anything but a regular file, truncating only after that check; `new_file`
creates a file exclusively (temporary files of write-then-rename: a link planted at the final name
is then replaced by the rename, never written through). Errors name the path.
"""

from __future__ import annotations

import errno
import os
import stat


class StoreError(RuntimeError):
    """A store or member is missing, incomplete, damaged or was made with other settings."""


class UnsafeFileError(StoreError):
    """A path the project would write is a symbolic link or not a regular file."""


def open_regular(
    path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode: int = 0o644
) -> int:
    """A file descriptor of `path` opened with `flags`, never through a symbolic link and only if
    it is a regular file: in a group-shared store or run folder anyone may plant a link to a file of
    yours (~/.bashrc) where we write. Truncates only after that check."""
    try:
        fd = os.open(
            path, (flags & ~os.O_TRUNC) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode
        )
    except OSError as e:  # a link (ELOOP, or EEXIST with O_EXCL), a folder, a FIFO without reader
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EEXIST) and _odd(path):
            raise UnsafeFileError(_odd(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeFileError(
            _odd(path) or f"{path}: is not a regular file; refusing to write to it"
        )
    if flags & os.O_TRUNC:
        os.ftruncate(fd, 0)
    return fd


def _odd(path) -> str | None:
    """Why `path` may not be written (a symbolic link, not a regular file), or None."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode):
        return None
    kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
    return (
        f"{path}: is {kind}; refusing to write through it (someone with write access to this "
        f"folder may have planted it): remove it and rerun"
    )


def new_file(path, mode: str = "w"):
    """`path` created exclusively (never through a link, never an existing file), open as `mode`."""
    return os.fdopen(open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), mode)


def check_inside(root, path) -> None:
    """Refuse `path` when a folder between `root` (a store or run folder, whose own path may hold
    links) and it is a symbolic link: O_NOFOLLOW guards only the last part of a path, and a
    planted `_staging/...` or `_done/<member>` link would send writes or deletes elsewhere."""
    root, path = os.path.abspath(root), os.path.abspath(path)
    rel = os.path.relpath(path, root)
    if rel == "." or rel.startswith(".."):
        return
    here = root
    for part in rel.split(os.sep)[
        :-1
    ]:  # the last part: opened with O_NOFOLLOW, or replaced by a rename
        here = os.path.join(here, part)
        try:
            mode = os.lstat(here).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISLNK(mode):
            raise UnsafeFileError(
                f"{here}: is a symbolic link inside {root}; refusing to write or remove through "
                f"it (someone with write access may have planted it): remove it and rerun"
            )

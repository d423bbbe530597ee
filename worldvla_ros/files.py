"""Reading the small files the package reads whole (configs, calibrations, run arguments): regular files
only, and never more than a stated size — a path pointing at /dev/zero, a FIFO or a multi-GB file is refused
at once instead of filling memory or blocking."""
from __future__ import annotations

import os
import stat
from pathlib import Path

KB, MB = 1 << 10, 1 << 20


class FileRefused(ValueError):
    """A file that is not a regular file, is larger than allowed, or cannot be read; says which and why."""


def check_regular(path: str | Path, max_bytes: int, what: str) -> Path:
    """``path`` if it names a regular file of at most ``max_bytes`` (for files a library reads itself)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise FileRefused(f'{what} {p}: {exc.strerror or exc}') from exc
    _check(st, p, max_bytes, what)
    return p


def read_regular(path: str | Path, max_bytes: int, what: str) -> bytes:
    """The whole of a regular file of at most ``max_bytes``; FileRefused otherwise. Opened without blocking
    (a FIFO never stalls the caller) and read up to the limit only (a file growing meanwhile is refused)."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0))
    except OSError as exc:
        raise FileRefused(f'{what} {p}: {exc.strerror or exc}') from exc
    try:
        _check(os.fstat(fd), p, max_bytes, what)
    except FileRefused:
        os.close(fd)
        raise
    with os.fdopen(fd, 'rb') as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileRefused(f'{what} {p}: larger than {_size(max_bytes)}')
    return data


def read_text(path: str | Path, max_bytes: int, what: str) -> str:
    try:
        return read_regular(path, max_bytes, what).decode('utf-8')
    except UnicodeDecodeError as exc:
        raise FileRefused(f'{what} {path}: not UTF-8 text ({exc})') from exc


def _check(st: os.stat_result, p: Path, max_bytes: int, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = 'a directory' if stat.S_ISDIR(st.st_mode) else 'a device, FIFO or socket'
        raise FileRefused(f'{what} {p}: {kind}, not a regular file')
    if st.st_size > max_bytes:
        raise FileRefused(f'{what} {p}: {_size(st.st_size)}, larger than the {_size(max_bytes)} such a file can be')


def _size(n: int) -> str:
    return f'{n / MB:.1f} MB' if n >= MB else f'{n / KB:.0f} kB'

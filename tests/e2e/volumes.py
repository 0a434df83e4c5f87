"""Folders that fail like real volumes: read-only (a read-only bind mount) or full (a small tmpfs).

Both need root (this machine's tests run as root; CI too). Without the rights to mount, the
test is skipped with that reason: chmod cannot stand in, because root ignores permissions
and a non-root permission error is a different fault (EACCES, not EROFS or ENOSPC).
"""
from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise OSError(proc.stderr.strip() or f"mount {' '.join(args)} failed")


def _umount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (a mount); this test runs as uid {os.geteuid()}")


class ReadOnly:
    """`folder` bind-mounted read-only on itself; `fix()` makes it writable again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def fix(self) -> None:
        _mount("-o", "remount,bind,rw", str(self.folder))


@contextmanager
def read_only(folder: Path) -> Iterator[ReadOnly]:
    _need_root("a read-only folder")
    try:
        _mount("--bind", str(folder), str(folder))
    except OSError as exc:
        pytest.skip(f"cannot bind-mount {folder} (no CAP_SYS_ADMIN here?): {exc}")
    try:
        _mount("-o", "remount,bind,ro", str(folder))
        yield ReadOnly(folder)
    finally:
        _umount(folder)


class Full:
    """A small tmpfs at `folder` filled to the last byte; `fix()` deletes the filler."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.filler = folder / "filler.bin"

    def fill(self) -> None:
        with self.filler.open("wb", buffering=0) as fh:
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        # a tmpfs keeps a little room in partly used pages: use it up with small files
        for i in range(1000):
            try:
                (self.folder / f"filler-{i}").write_bytes(b"\0" * 512)
            except OSError:
                break

    def fix(self) -> None:
        self.filler.unlink()
        for extra in self.folder.glob("filler-*"):
            extra.unlink()


@contextmanager
def full(folder: Path, size_kib: int = 512) -> Iterator[Full]:
    """An empty tmpfs of `size_kib` at `folder` (what was there is hidden until the end)."""
    _need_root("a full volume")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _mount("-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder))
    except OSError as exc:
        pytest.skip(f"cannot mount a tmpfs at {folder} (no CAP_SYS_ADMIN here?): {exc}")
    try:
        yield Full(folder)
    finally:
        _umount(folder)

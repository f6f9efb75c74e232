"""A local append-only spool of lines: what a process must not lose if it is killed before shipping it.

Each process that appends owns its own files in the spool folder, named after an owner id:

    <owner>.lock          held with flock(LOCK_EX) for the owner's lifetime; free means the owner is gone
    <owner>.<seq>.jsonl   segments, appended with one write() per batch and rotated at `segment_bytes`
    <owner>.cursor        "<seq> <offset>": how far the owner has shipped (rewritten in place, no fsync)

A line handed to `append` is in the kernel's page cache when `append` returns, so it survives `kill -9`
of the process (not a power cut: that would need an fsync per batch). Shipping reads lines back in order,
and `shipped` moves the cursor and deletes finished segments. `adopt_orphans` ships what dead owners left;
the receiver must be idempotent, because a cursor written late makes some lines ship twice. A final line
without its newline is a write the kill cut short: its caller never returned, so it is dropped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_CURSOR_FORMAT = "{:012d} {:016d}\n"  # fixed width: rewritten in place without truncating


class SpoolWriteError(OSError):
    """The disk refused an append (full, quota, file size limit); none of its lines count as spooled."""

    left_partial = False  # the segment could not be cut back: its tail holds part of the failed write


@dataclass(frozen=True)
class Position:
    """Where shipping has reached: a segment number and a byte offset in it."""

    seq: int
    offset: int


class Spool:
    """This process's segments in `folder`; thread-safe. Files are created on the first `append`."""

    def __init__(self, folder: str | os.PathLike[str], segment_bytes: int = 8 << 20):
        if segment_bytes < 1:
            raise ValueError(f"segment_bytes must be at least 1; got {segment_bytes}.")
        self.folder = Path(folder)
        self.segment_bytes = segment_bytes
        self.owner = f"{os.getpid()}-{secrets.token_hex(4)}"
        # Taken by append and close only. The shipping side (read, shipped) runs on the log's writer thread
        # and takes no lock the appender holds: a signal handler that closes the log while the main thread
        # is inside append must find the writer able to finish. It relies on append writing the bytes before
        # it counts them, and on single dict operations being atomic under the GIL.
        self._lock = threading.RLock()  # re-entrant: a signal handler may close while append holds it
        self._active = 0  # the segment appended to
        self._lock_fd: int | None = None
        self._cursor_fd: int | None = None
        self._fd: int | None = None  # the segment being appended to
        self._sizes: dict[int, int] = {}  # seq -> bytes appended, for this owner's live segments
        self._damaged = False  # the active segment ends in a failed write that could not be cut off
        self._read = Position(0, 0)
        self._appended_bytes = 0
        self._shipped_bytes = 0
        self._closed = False

    # --- appending ------------------------------------------------------------------------------------

    def append(self, data: bytes) -> None:
        """Write whole lines (`data` ends with a newline) in one write; durable against a process kill.

        Raises SpoolWriteError, leaving the segment as it was, when the disk refuses the write (full,
        quota, file size limit): the lines were not spooled, and the offsets of later lines do not move.
        """
        if not data.endswith(b"\n"):
            raise ValueError("Spool.append takes whole lines: the data must end with a newline.")
        with self._lock:
            if self._closed:
                raise RuntimeError("This spool is closed; open a new one to append again.")
            try:
                if self._fd is None:
                    self._open()
                seq = self._active
                if self._sizes[seq] >= self.segment_bytes or self._damaged:
                    seq = self._rotate()
            except OSError as err:  # no room for a new file either
                raise SpoolWriteError(err.errno, f"{err.strerror} ({err.filename})") from err
            try:
                _write_all_or_nothing(self._fd, data, self._sizes[seq])
            except SpoolWriteError as err:
                # The reader stops at the size counted here; the next append starts a clean segment.
                self._damaged = err.left_partial
                raise
            self._sizes[seq] += len(data)
            self._appended_bytes += len(data)

    @property
    def unshipped_bytes(self) -> int:
        return self._appended_bytes - self._shipped_bytes

    def _open(self) -> None:
        """Create this owner's files; a step that failed (no room) is retried by the next append."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._lock_fd is None:  # a second flock from this process on a new descriptor would block
            fd = os.open(self._path("lock"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_fd = fd
        if self._cursor_fd is None:
            self._cursor_fd = os.open(self._path("cursor"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            self._write_cursor(self._read)
        self._fd = os.open(self._segment(0), _APPEND_FLAGS, 0o600)
        self._sizes[0] = 0

    def _rotate(self) -> int:
        seq = self._active + 1
        fd = os.open(self._segment(seq), _APPEND_FLAGS, 0o600)
        os.close(self._fd)
        self._fd, self._sizes[seq] = fd, 0
        self._damaged = False
        self._active = seq  # only now may the reader move on to it: the old segment is complete
        return seq

    # --- shipping -------------------------------------------------------------------------------------

    def read(self, max_lines: int, max_bytes: int = 4 << 20) -> tuple[list[bytes], Position]:
        """Up to `max_lines` unshipped lines in order, and the position just after them."""
        pos, sizes = self._read, self._sizes.copy()  # a consistent snapshot: see __init__
        lines: list[bytes] = []
        while len(lines) < max_lines and pos.seq in sizes:
            end = sizes[pos.seq]
            if pos.offset >= end:
                if pos.seq + 1 not in sizes:
                    break
                pos = Position(pos.seq + 1, 0)
                continue
            with open(self._segment(pos.seq), "rb") as fh:
                fh.seek(pos.offset)
                chunk = fh.read(min(end - pos.offset, max_bytes))
            taken = chunk.splitlines(keepends=True)[: max_lines - len(lines)]
            lines.extend(taken)
            pos = Position(pos.seq, pos.offset + sum(map(len, taken)))
            if len(chunk) >= max_bytes:
                break
        return lines, pos

    def shipped(self, pos: Position, nbytes: int) -> None:
        """Everything before `pos` is safely elsewhere: move the cursor, delete finished segments."""
        self._read = pos
        self._shipped_bytes += nbytes
        self._write_cursor(pos)
        for seq in [s for s in list(self._sizes) if s < pos.seq]:
            self._sizes.pop(seq, None)
            _unlink(self._segment(seq))

    def _write_cursor(self, pos: Position) -> None:
        cursor = self._cursor_fd
        if cursor is None:
            return
        with contextlib.suppress(OSError):  # closed under us: the next owner starts from the last one
            os.pwrite(cursor, _CURSOR_FORMAT.format(pos.seq, pos.offset).encode(), 0)

    # --- dead owners ----------------------------------------------------------------------------------

    def orphan_bytes(self) -> int:
        """Bytes that owners no longer alive left in the folder (a cheap scan; nothing is locked)."""
        total = 0
        for owner in self._other_owners():
            for path in self.folder.glob(f"{owner}.*.jsonl"):
                total += _size(path)
        return total

    def adopt_orphans(self, ship: Callable[[list[bytes]], None], batch_lines: int = 256) -> int:
        """Ship, in order, the lines owners that died left behind; returns how many were shipped.

        `ship` must commit its lines or raise; on a raise the owner's files stay for the next try.
        """
        shipped = 0
        for owner in self._other_owners():
            lock = self.folder / f"{owner}.lock"
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # another adopter just finished it
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                        continue  # alive, or being adopted by another process
                    raise
                shipped += _ship_owner(self.folder, owner, ship, batch_lines)
                for path in (self.folder / f"{owner}.cursor", lock):
                    _unlink(path)
            finally:
                os.close(fd)
        return shipped

    def _other_owners(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        names = [p.name for p in self.folder.iterdir()]
        owners = {m.group(1) for m in map(_OWNER_FILE.match, names) if m}
        owners.discard(self.owner)
        return sorted(owners)

    # --- closing --------------------------------------------------------------------------------------

    def close(self) -> int:
        """Close the files and release the owner lock; returns unshipped bytes, left for adoption."""
        with self._lock:
            if self._closed:
                return self.unshipped_bytes
            self._closed = True
            left = self.unshipped_bytes
            for fd in (self._fd, self._cursor_fd):
                if fd is not None:
                    os.close(fd)
            if self._lock_fd is not None:
                if left == 0:  # nothing to adopt: leave no files behind
                    for seq in list(self._sizes):
                        _unlink(self._segment(seq))
                    _unlink(self._path("cursor"))
                    _unlink(self._path("lock"))
                os.close(self._lock_fd)  # releases the flock: the files are now an orphan's
            self._fd = self._cursor_fd = self._lock_fd = None
            return left

    def _path(self, kind: str) -> Path:
        return self.folder / f"{self.owner}.{kind}"

    def _segment(self, seq: int) -> Path:
        return self.folder / f"{self.owner}.{seq:06d}.jsonl"


_OWNER_FILE = re.compile(r"^(\d+-[0-9a-f]{8})\.(?:lock|cursor|\d{6}\.jsonl)$")
_APPEND_FLAGS = os.O_CREAT | os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC


def _write_all_or_nothing(fd: int, data: bytes, size: int) -> None:
    """Append `data` to the file of `fd`, which holds `size` bytes; on any failure cut it back to `size`.

    A short write followed by an error (ENOSPC, EFBIG) would otherwise leave half a batch in the segment:
    the reader, which trusts the sizes it counted, would then read every later line from a shifted offset.
    """
    view = memoryview(data)
    try:
        while view:  # a regular file takes it all at once; loop for the rare short write
            written = os.write(fd, view)
            if written == 0:
                raise OSError(errno.ENOSPC, "the disk took none of the bytes")
            view = view[written:]
    except OSError as err:
        try:
            os.ftruncate(fd, size)
        except OSError as cut:
            failed = SpoolWriteError(
                err.errno, f"{err.strerror}; cutting the partial write off failed too ({cut.strerror})"
            )
            failed.left_partial = True
            raise failed from err
        raise SpoolWriteError(err.errno, err.strerror or str(err)) from err


def _ship_owner(folder: Path, owner: str, ship: Callable[[list[bytes]], None], batch_lines: int) -> int:
    start = _read_cursor(folder / f"{owner}.cursor")
    segments = sorted(folder.glob(f"{owner}.*.jsonl"), key=lambda p: int(p.name.split(".")[1]))
    shipped = 0
    for path in segments:
        seq = int(path.name.split(".")[1])
        if seq < start.seq:
            _unlink(path)
            continue
        data = path.read_bytes()
        if seq == start.seq:
            data = data[start.offset :]
        offset = start.offset if seq == start.seq else 0
        lines = data.splitlines(keepends=True)
        if lines and not lines[-1].endswith(b"\n"):
            log.warning("%s ends in a cut-off line (its write never returned); dropping it.", path.name)
            lines.pop()
        for i in range(0, len(lines), batch_lines):
            batch = lines[i : i + batch_lines]
            ship(batch)
            offset += sum(map(len, batch))
            # A later adopter (this one failed on the next batch) starts after what committed.
            (folder / f"{owner}.cursor").write_text(_CURSOR_FORMAT.format(seq, offset))
        shipped += len(lines)
        _unlink(path)
    return shipped


def _read_cursor(path: Path) -> Position:
    try:
        seq, offset = path.read_text().split()
        return Position(int(seq), int(offset))
    except (FileNotFoundError, ValueError):  # none written yet, or cut short: ship from the start
        return Position(0, 0)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)

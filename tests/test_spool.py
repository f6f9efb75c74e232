"""The spool under the inference log: append, ship, trim, and what a dead owner leaves behind."""

from __future__ import annotations

import os

import pytest

from serving.spool import Spool


def _lines(n: int, start: int = 0) -> list[bytes]:
    return [f'["line {i}"]\n'.encode() for i in range(start, start + n)]


def _ship_all(spool: Spool) -> list[bytes]:
    shipped = []
    while True:
        lines, pos = spool.read(max_lines=7)
        if not lines:
            return shipped
        spool.shipped(pos, sum(map(len, lines)))
        shipped += lines


def test_lines_come_back_in_order_and_shipped_segments_are_deleted(tmp_path):
    spool = Spool(tmp_path, segment_bytes=100)
    expected = _lines(40)
    for i in range(0, 40, 4):
        spool.append(b"".join(expected[i : i + 4]))
    assert len(list(tmp_path.glob("*.jsonl"))) > 3  # rotated
    assert _ship_all(spool) == expected
    assert spool.unshipped_bytes == 0
    assert len(list(tmp_path.glob("*.jsonl"))) == 1  # only the segment still appended to
    assert spool.close() == 0
    assert list(tmp_path.iterdir()) == []  # nothing to adopt: nothing left behind


def test_a_dead_owners_lines_are_shipped_once_from_its_cursor_without_the_cut_off_line(tmp_path):
    owner = "4242-0badc0de"
    (tmp_path / f"{owner}.lock").touch()  # nobody holds its flock: the owner is gone
    (tmp_path / f"{owner}.000000.jsonl").write_bytes(b"".join(_lines(5)))
    (tmp_path / f"{owner}.000001.jsonl").write_bytes(b"".join(_lines(3, 5)) + b'["line 8", "cut of')
    first = len(b"".join(_lines(2)))
    (tmp_path / f"{owner}.cursor").write_text(f"{0:012d} {first:016d}\n")  # lines 0-1 had shipped
    (tmp_path / "rejected.jsonl").write_text("not an owner's file\n")

    shipped: list[bytes] = []
    adopter = Spool(tmp_path)
    assert adopter.orphan_bytes() > 0
    assert adopter.adopt_orphans(shipped.extend, batch_lines=2) == 6
    assert shipped == _lines(6, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rejected.jsonl"]
    assert adopter.adopt_orphans(shipped.extend) == 0  # nothing twice


def test_a_live_owner_is_not_adopted_and_a_failed_ship_keeps_the_files(tmp_path):
    alive = Spool(tmp_path)
    alive.append(b"".join(_lines(3)))
    other = Spool(tmp_path)
    assert other.adopt_orphans(lambda lines: None) == 0  # its flock is held

    alive._closed = True  # close() without giving up the files: the process "dies" with 3 unshipped
    os.close(alive._lock_fd)

    def refuse(lines):
        raise ConnectionError("database down")

    with pytest.raises(ConnectionError):
        other.adopt_orphans(refuse)
    assert len(list(tmp_path.glob("*.jsonl"))) == 1  # kept for the next try
    shipped: list[bytes] = []
    assert other.adopt_orphans(shipped.extend) == 3 and shipped == _lines(3)

"""Append-only, hash-chained JSON-lines audit log: every request, tamper-evident.

Each line is a JSON object with ``seq`` (1, 2, ...), ``prev`` (the previous line's ``hash``,
64 zeros for the first) and ``hash`` = SHA-256 of ``prev`` + the canonical JSON of the line
without ``hash``. Editing a line breaks its hash; deleting or reordering lines breaks ``seq`` and
``prev``. A sidecar ``LOG.head`` (line count and last hash, overwritten in place after each
append; after a crash it may lag the log, never lead it) also exposes a cut-off tail. Like any
hash chain this is tamper-evident, not tamper-proof: someone who can rewrite the whole file and
its head can forge a consistent log, so ship the head hash elsewhere (syslog, a ticket) when
that matters.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from medsec.errors import MedsecError

GENESIS = "0" * 64
HEAD_SUFFIX = ".head"
_HEAD_BYTES = 128  # fixed-size head record, overwritten in place (one sector: no torn writes)


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def entry_hash(entry: Mapping[str, Any]) -> str:
    """Chain hash of one entry (everything but its ``hash`` field; ``prev`` included)."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(str(entry.get("prev", "")).encode() + _canonical(body)).hexdigest()


@dataclass(frozen=True)
class AuditCheck:
    """Outcome of :func:`verify_log`: ``bad_line`` is 1-based, None when the log is intact."""

    lines: int
    bad_line: int | None
    reason: str
    last_hash: str

    @property
    def ok(self) -> bool:
        return self.bad_line is None


def _head_path(path: Path) -> Path:
    return path.with_name(path.name + HEAD_SUFFIX)


def verify_log(path: Path) -> AuditCheck:
    """Walk the chain; report the first line that is not what the chain says it must be."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MedsecError(f"cannot read audit log {path}: {exc.strerror}") from exc
    prev, hashes = GENESIS, list[str]()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        return AuditCheck(len(lines), len(lines), "last line is incomplete (no newline)", prev)
    for n, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return AuditCheck(len(lines), n, "not a JSON object", prev)
        if not isinstance(entry, dict):
            return AuditCheck(len(lines), n, "not a JSON object", prev)
        if entry.get("seq") != n:
            return AuditCheck(
                len(lines), n, f"sequence number {entry.get('seq')!r}, expected {n} "
                "(line deleted, inserted or reordered)", prev,
            )  # fmt: skip
        if entry.get("prev") != prev:
            return AuditCheck(len(lines), n, "prev does not match the previous line's hash", prev)
        if entry.get("hash") != entry_hash(entry):
            return AuditCheck(len(lines), n, "hash does not match the content (edited)", prev)
        prev = entry["hash"]
        hashes.append(prev)
    head = _head_path(path)
    if head.exists():
        try:
            text = head.read_text()
            recorded = json.loads(text) if text.strip() else {"lines": 0, "hash": GENESIS}
            want_lines, want_hash = int(recorded["lines"]), str(recorded["hash"])
        except (OSError, ValueError, KeyError, TypeError):
            return AuditCheck(len(lines), len(lines) + 1, f"unreadable head file {head}", prev)
        if want_lines > len(lines):
            reason = f"head file records {want_lines} line(s), log has {len(lines)} (tail cut)"
            return AuditCheck(len(lines), len(lines) + 1, reason, prev)
        if want_lines and hashes[want_lines - 1] != want_hash:
            reason = f"line {want_lines} differs from the hash the head file recorded"
            return AuditCheck(len(lines), want_lines, reason, prev)
    return AuditCheck(len(lines), None, f"{len(lines)} line(s), chain intact", prev)


class AuditLog:
    """Thread-safe appender; one process per log (an exclusive lock on the file enforces it).

    Opening an existing log verifies it first and refuses a broken one, so a chain is never
    silently continued from a tampered state. ``fsync='always'`` makes each line durable before
    the response is sent; ``'never'`` leaves flushing to the OS (faster, may lose the last
    lines on a power cut, still detectably).
    """

    def __init__(self, path: Path, fsync: str = "always") -> None:
        self.path = Path(path)
        self._fsync = fsync == "always"
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh: BinaryIO = open(self.path, "ab")  # noqa: SIM115 - open for the service life
        except OSError as exc:
            reason = f"{exc.strerror}: {exc.filename}"
            raise MedsecError(f"audit log {self.path}: cannot open ({reason})") from exc
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._fh.close()
            raise MedsecError(f"audit log {self.path} is in use by another process") from exc
        check = verify_log(self.path)
        if not check.ok:
            self._fh.close()
            raise MedsecError(
                f"audit log {self.path} is broken at line {check.bad_line}: {check.reason}; "
                "keep it as evidence and configure a new log path"
            )
        self._seq, self._prev = check.lines, check.last_hash
        self._synced = self._seq
        self._sync_lock = threading.Lock()
        self._head = os.open(_head_path(self.path), os.O_RDWR | os.O_CREAT, 0o644)

    @property
    def lines(self) -> int:
        """Lines written so far (including those found at start)."""
        return self._seq

    def append(self, record: Mapping[str, Any]) -> str:
        """Chain and write one record; returns its hash once the line is durable per policy."""
        with self._lock:
            entry = {
                **record,
                "seq": self._seq + 1,
                "time": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
                "prev": self._prev,
            }
            entry["hash"] = entry_hash(entry)
            self._fh.write(_canonical(entry) + b"\n")
            self._fh.flush()
            self._seq, self._prev = entry["seq"], entry["hash"]
            head = _canonical({"lines": self._seq, "hash": self._prev})
            os.pwrite(self._head, head.ljust(_HEAD_BYTES - 1) + b"\n", 0)
        if self._fsync:
            self._sync(entry["seq"])
        return entry["hash"]

    def _sync(self, seq: int) -> None:
        """Group commit: one fsync makes every line written so far durable, so concurrent
        requests waiting here share it instead of queueing one fsync each."""
        with self._sync_lock:
            if self._synced >= seq:
                return
            with self._lock:
                target = self._seq
            os.fsync(self._fh.fileno())
            self._synced = target

    def close(self) -> None:
        with self._sync_lock, self._lock:
            if self._fsync:
                os.fsync(self._fh.fileno())
                os.fsync(self._head)
            self._fh.close()
            os.close(self._head)

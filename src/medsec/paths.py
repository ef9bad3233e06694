"""The one output-path guard every command uses before it does any work.

A command that finds out only after an hour of training that it may not write its result, or
that silently replaces a file the user gave, has failed the user twice; these checks run first
and say what is wrong in one line (as :class:`MedsecError`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from medsec.errors import MedsecError


def _exists(path: Path) -> bool:
    """Whether anything (a dangling link included) is at ``path``."""
    try:
        path.lstat()
    except (FileNotFoundError, NotADirectoryError):  # NotADirectory: a component is a file
        return False
    return True


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists."""
    return next((p for p in (path, *path.parents) if _exists(p)), Path(path.anchor or "."))


def _unwritable(directory: Path) -> str | None:
    """Why files cannot be created in ``directory`` (or, if it does not exist yet, in its
    nearest existing ancestor, where it would be made); None when they can. Probing with a
    real temporary file is the only test that agrees with the later write (ACLs, read-only
    mounts, root)."""
    base = _nearest_existing(directory)
    if not base.is_dir():
        return f"{base} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=base, prefix=".medsec-probe-"):
            pass
    except OSError as exc:
        return f"{base}: {exc.strerror or exc}"
    return None


def check_writable_dir(directory: str | Path, what: str = "output directory") -> None:
    """Refuse, before any work, a directory that cannot be created or written."""
    reason = _unwritable(Path(directory))
    if reason is not None:
        raise MedsecError(f"cannot write {what} {directory}: {reason}")


def check_output_file(
    path: str | Path,
    *,
    force: bool | None = None,
    suffixes: Iterable[str] | None = None,
    what: str = "output",
) -> Path:
    """Check, before any work, that ``path`` can be written as a new file.

    Refused: an existing file (unless ``force``; None means the command has no --force), a
    directory or other non-file (always), a suffix not in ``suffixes`` (when given), a parent
    that is a file or not writable.
    """
    path = Path(path)
    if suffixes is not None:
        allowed = tuple(suffixes)
        if path.suffix.lower() not in allowed:
            raise MedsecError(
                f"{what} {path} must end in {' or '.join(allowed)} (that is the format written)"
            )
    if _exists(path):
        if not path.is_file():
            raise MedsecError(f"{what} {path} exists and is not a regular file")
        if not force:
            hint = "" if force is None else "; pass --force to replace it"
            raise MedsecError(f"{what} {path} exists; refusing to overwrite it{hint}")
    reason = _unwritable(path.parent)
    if reason is not None:
        raise MedsecError(f"cannot write {what} {path}: {reason}")
    return path


def claim_run_dir(
    out: str | Path,
    marker: str,
    *,
    record: dict[str, object],
    is_older_run: Callable[[Path], bool] | None = None,
) -> Path:
    """Make ``out`` the directory of a resumable run, identified by the file ``marker``.

    A new or empty directory is claimed (the marker is written first); one holding the
    marker is a previous run and is resumed; any other non-empty directory is the user's and
    is refused, so nothing in it is overwritten. ``is_older_run`` recognises runs made
    before the marker existed (they are claimed too).
    """
    from medsec.utils import atomic_write_json

    out = Path(out)
    if _exists(out) and not out.is_dir():
        raise MedsecError(f"output directory {out} exists and is not a directory")
    check_writable_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        entries = sorted(p.name for p in out.iterdir())
        if marker not in entries:
            if entries and not (is_older_run is not None and is_older_run(out)):
                shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
                raise MedsecError(
                    f"output directory {out} is not empty ({shown}) and is not a medsec run "
                    f"(no {marker}); choose a new or empty directory"
                )
            atomic_write_json(out / marker, record)
    except OSError as exc:
        raise MedsecError(f"cannot use output directory {out}: {exc.strerror or exc}") from exc
    return out

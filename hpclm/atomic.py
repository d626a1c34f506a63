"""Files replaced whole: written beside their target under a temporary name, then renamed over it, so a
reader (or a run killed mid-write) sees the old file or the new one, never half of one."""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable


_TEMPORARY = re.compile(r"^\..+\.tmp-\d+")


def is_temporary(path: str | Path) -> bool:
    """Whether path is one of replace_file's temporary files (left behind only by a killed writer)."""
    return bool(_TEMPORARY.match(Path(path).name))


def replace_file(path: str | Path, write: Callable[[Path], None], *, durable: bool = False) -> Path:
    """Call write(tmp) and rename tmp over path; on any error the old file stays and tmp is removed.

    tmp ends in path's suffix (matplotlib picks the format from it); durable=True fsyncs the file and
    its folder, for files a restart depends on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        if durable:
            fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync(path.parent)
    return path


def write_text(path: str | Path, text: str, *, durable: bool = False) -> Path:
    """path's new contents, all or nothing."""
    return replace_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=durable)


def fsync(path: str | Path) -> None:
    """Flush a file's or a folder's contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def blocker(path: str | Path) -> Path | None:
    """What stops this process from creating `path` (a file or folder) with its missing parents: the
    nearest existing ancestor when it is not a writable folder; None when nothing does. Permissions
    only (a full disk shows at the write)."""
    p = Path(path).absolute()
    existing = next(q for q in (p.parent, *p.parent.parents) if q.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return existing
    return None


def remove_tree(path: Path) -> bool:
    """Delete a folder whole, read-only contents too (their folders are made writable first); True if gone."""
    if not path.exists():
        return True
    for dirpath, _, _ in os.walk(path):
        try:
            os.chmod(dirpath, os.stat(dirpath).st_mode | 0o700)
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)
    return not path.exists()


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the folder tmp to out; an existing out is moved aside first and removed only afterwards
    (put back where it was if the rename fails)."""
    if out.exists():
        aside = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, aside)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(aside, out)
            raise
        if not remove_tree(aside):
            print(f"warning: could not delete the replaced {out.name} at {aside}: remove it by hand", file=sys.stderr)
    else:
        os.rename(tmp, out)

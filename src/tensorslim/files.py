"""File-system helpers every writer in tensorslim shares (a leaf module: standard library
only): atomic writes (temp name, then rename), a real writability test, an advisory lock on a
folder, and the swap of a finished folder into place."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator


def check_writable(folder: Path, path: Path) -> None:
    """Raise PermissionError unless files can be created in ``folder`` (or, when it does
    not exist yet, in its nearest existing ancestor): a real test, also right for root."""
    folder = existing_folder(folder)
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".tensorslim-write-test-"))
    except OSError as e:
        raise PermissionError(f"cannot write {path}: {folder} is not a writable folder "
                              f"({e.strerror or e})") from None


def existing_folder(folder: Path) -> Path:
    """``folder`` or, when it does not exist, its nearest existing ancestor."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on ``folder`` itself (no lock file left behind); a no-op where
    flock is unavailable (the swap then retries on the race)."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def swap_into_place(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; a (checked) checkpoint there is renamed aside first and
    deleted after, so ``path`` is never half-written. Retries if a writer without the lock races."""
    for attempt in range(50):
        aside = path.parent / f".{path.name}.ts-old-{os.getpid()}-{attempt}-{time.time_ns()}"
        try:
            if path.exists() and any(path.iterdir()):
                os.replace(path, aside)
            os.replace(tmp, path)  # onto a missing path or an empty folder
        except OSError as e:
            if aside.exists() and not path.exists():
                os.replace(aside, path)  # put the old checkpoint back
            if isinstance(e, PermissionError) or attempt == 49:
                raise
            time.sleep(0.01)
            continue
        shutil.rmtree(aside, ignore_errors=True)
        return


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` for a temporary file next to ``path``, then rename it into
    place: readers never see a half-written file, and on error nothing is left behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))

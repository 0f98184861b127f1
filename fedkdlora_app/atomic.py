"""Write-then-rename, so a crash never leaves half a results file, checkpoint or model."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_file(target: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a temporary sibling file, which then replaces `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.chmod(0o644)  # mkstemp makes it private
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_dir(target: Path, write: Callable[[Path], None], keep_existing: bool = False) -> None:
    """`write` fills a temporary sibling folder, which then replaces `target`.

    `keep_existing`: a `target` that exists (e.g. written meanwhile by another process
    with the same content) is left as it is, never removed under a reader.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        if keep_existing:
            with contextlib.suppress(OSError):  # rename onto a non-empty folder fails: keep that one
                os.rename(tmp, target)
            return
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

"""Outputs that appear complete or not at all, with the user's umask, and the tables the CLIs write.

The one atomic writer of the project (:func:`atomic_path`, :func:`atomic_dir`) and the one table
writer (:func:`write_csv`, :func:`markdown_table`); every command writes its files through them.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Iterator

__all__ = ["TMP_SUFFIX", "current_umask", "apply_umask", "atomic_path", "atomic_dir", "replace_dir",
           "remove_stale_temps", "atomic_write_text", "write_csv", "markdown_table"]

TMP_SUFFIX = ".tmp"
"""Temporary files and folders of :func:`atomic_path` / :func:`atomic_dir` are ``.NAME.XXXX.tmp``
beside their final name (what :func:`remove_stale_temps` looks for)."""


def current_umask() -> int:
    """The process umask, read without changing it (Linux ``/proc/self/status``).

    Elsewhere it is set and restored at once (``os.umask``), which is racy only against another
    thread changing the umask at the same moment.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike[str]) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would: ``0o666`` (files) or ``0o777``
    (folders) less the umask.

    ``tempfile.mkstemp``/``mkdtemp`` create 0600/0700, which a rename would carry to outputs that
    colleagues on a shared drive then cannot read.
    """
    full = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, full & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path``, on failure it is removed.

    The one way this project writes a file so that it appears complete or not at all. The file gets
    the permissions the user's umask gives a new file (:func:`apply_umask`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` (an older folder there is
    removed), on failure it is removed. The folder equivalent of :func:`atomic_path`; the folder and
    everything in it get the umask's modes (some writers, e.g. safetensors, create 0600 files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX))
    try:
        yield tmp
        for p in (tmp, *tmp.rglob("*")):
            if not p.is_symlink():
                apply_umask(p)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp_dir: str | os.PathLike[str], final_dir: str | os.PathLike[str]) -> None:
    """Move a completed temp folder to its final name, replacing an older one."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


def remove_stale_temps(folder: str | os.PathLike[str]) -> int:
    """Delete the temporaries (``.*.tmp``) that a killed :func:`atomic_path`/:func:`atomic_dir`
    left anywhere under ``folder``; returns how many. Not while another process writes there."""
    n = 0
    for p in sorted(Path(folder).rglob(f".*{TMP_SUFFIX}"), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write text to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | os.PathLike[str], columns: Sequence[str],
              rows: Iterable[Mapping[str, Any] | Sequence[Any]], *, delimiter: str = ",") -> Path:
    """Write a table atomically: a header of ``columns``, then one line per row (a mapping, read by
    column name with missing keys empty, or a sequence in column order). Returns ``path``."""
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row.get(c, "") for c in columns] if isinstance(row, Mapping) else list(row))
    path = Path(path)
    atomic_write_text(path, buf.getvalue())
    return path


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table (no trailing newline); ``align`` per column: ``"l"`` or ``"r"`` (default left)."""
    rule = ["---:" if a == "r" else "---" for a in (align or ["l"] * len(columns))]
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)

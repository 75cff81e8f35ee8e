"""Paths read from a folder's own files stay inside that folder.

Artifacts and bundles are copied between machines and may come from someone else. A path read from
one of their JSON files, or a symlink inside them, must never lead a reader to another of the user's
files (an SSH key, another model). This module imports nothing from deploykit, so that a standalone
script (the bundle's ``run.py``) can carry a copy of it.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath


class OutsideFolder(ValueError):
    """A path that leaves the folder it must stay in; the message says how, for the caller to prefix
    with the file and the entry it came from."""


def _within(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def inside(root: str | os.PathLike, rel: object) -> Path:
    """``root / rel``, where ``rel`` must be a relative path that stays in ``root`` with symlinks followed.

    Raises :class:`OutsideFolder` for anything else: not a string, empty, absolute, with a ``..`` part,
    or leading out through a symlink (checked whether or not the final file exists).
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise OutsideFolder(f"{rel!r} is not a relative path")
    if rel.startswith(("/", "\\")) or PureWindowsPath(rel).drive:
        raise OutsideFolder(f"{rel!r} is an absolute path")
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        raise OutsideFolder(f"{rel!r} goes up out of the folder ('..')")
    path = Path(root) / rel
    real = os.path.realpath(path)
    if not _within(real, os.path.realpath(root)):
        raise OutsideFolder(f"{rel!r} leads out of the folder through a symlink (to {real})")
    return path


def links_leaving(folder: str | os.PathLike, root: str | os.PathLike) -> dict[str, str]:
    """Every symlink under ``folder`` whose target lies outside ``root``: ``{path relative to folder: target}``.

    Nothing is followed while looking (a linked folder is reported, not entered), so the check reads no
    file of the targets. ``folder`` itself should have been checked with :func:`inside` first.
    """
    real_root = os.path.realpath(root)
    found = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) and not _within(target := os.path.realpath(path), real_root):
                found[Path(path).relative_to(folder).as_posix()] = target
    return dict(sorted(found.items()))

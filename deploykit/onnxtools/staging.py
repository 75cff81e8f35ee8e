"""Publishing a set of ONNX files (a graph and its external data) so that it appears whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from deploykit.onnxtools.cleanup import data_file_name


@contextlib.contextmanager
def staged_folder(dest: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success its files appear in ``dest``, on failure nothing does.

    When ``dest`` is absent or empty the staging folder (a hidden sibling) is renamed onto it: one atomic
    step. When ``dest`` already holds other files, the staged files are moved in one by one, ``*.onnx``
    last (an old ``*.onnx`` of the same name is removed first), so a ``model.onnx`` that exists always
    has its complete ``model.onnx_data`` beside it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    whole = not dest.exists() or (dest.is_dir() and not any(dest.iterdir()))
    staging = (dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}" if whole
               else dest / f".tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        if whole:
            os.replace(staging, dest)  # rename(2) replaces an empty directory
            return
        files = sorted(staging.iterdir(), key=lambda f: f.suffix == ".onnx")
        staged = {f.name for f in files}
        for f in files:
            if f.suffix == ".onnx":
                # the earlier model goes first, and with it a data file the new one does not replace
                for old in (dest / f.name, dest / data_file_name(f)):
                    if old.exists() and (old.name == f.name or old.name not in staged):
                        old.unlink()
        for f in files:
            if (dest / f.name).is_dir():
                shutil.rmtree(dest / f.name)
            os.replace(f, dest / f.name)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename.

An interrupted process (Ctrl-C, SIGKILL, power loss) leaves either the old file or the new one,
never a file that looks finished and is not.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
import stat
import struct
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from deploykit.errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A temporary folder with ordinary permissions (mkdtemp's 0700 would survive the rename)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def atomic_write_chunks(path: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> None:
    """Write ``chunks`` one after the other, atomically: a large file never has to fit in memory whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would survive the rename
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write_chunks(path, [data])


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                       torch.bool: "BOOL"}


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Save tensors as safetensors, atomically, streaming one tensor at a time.

    ``safetensors.torch.save`` builds the whole file in memory first: for SDXL's 10 GB UNet that is a
    second copy of the weights, which a 24 GB machine cannot hold beside the model. The format is a
    little-endian u64 header length, a JSON header of dtypes, shapes and byte offsets (padded to 8
    bytes), then the raw little-endian tensor bytes in header order; ``safetensors`` reads it back.
    """
    if sys.byteorder != "little":  # the raw bytes below are the machine's; the format wants little-endian
        raise OSError("writing safetensors needs a little-endian machine")
    header: dict[str, Any] = {"__metadata__": {k: str(v) for k, v in metadata.items()}} if metadata else {}
    offset, ordered = 0, []
    for name, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} cannot be stored as safetensors here")
        t = tensor.detach().to("cpu").contiguous()
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
        ordered.append(t)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def chunks() -> Iterator[bytes | memoryview]:
        yield struct.pack("<Q", len(blob)) + blob
        for t in ordered:
            if t.numel():
                yield memoryview(t.reshape(-1).view(torch.uint8).numpy())

    atomic_write_chunks(path, chunks())


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read through a memory map, one tensor at a time.

    Each is cloned into its own allocation: the tensors safetensors hands out keep its buffer's
    alignment, on which the CPU kernels took another path and moved results in the last bits
    (a reloaded model no longer matched the one saved exactly).
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name).clone() for name in f.keys()}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a finished temporary folder into place; an older folder of the same name is removed."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


def read_text_file(path: str | os.PathLike, max_bytes: int, what: str = "file") -> str:
    """A text file the user names (a recipe, a prompt file), whole: a regular file of at most ``max_bytes``,
    in UTF-8 (a leading byte-order mark is dropped). Anything else is an InputError naming ``what`` and the path."""
    try:
        # O_NONBLOCK: a FIFO opens without waiting for a writer, and is refused below
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{what} {path} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"{what} {path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise InputError(f"{what} {path} is larger than {max_bytes / 2**20:g} MiB, the most deploykit reads")
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise InputError(f"{what} {path} is UTF-16 (or UTF-32) text: save it as UTF-8")
    try:
        return raw.removeprefix(codecs.BOM_UTF8).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}): "
                         "save it as UTF-8") from None

"""Sample grids as PNG: one labelled column block per model, the same noise in every row."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from deploykit.eval.fidelity import to_unit
from deploykit.io import atomic_write_bytes


def _tile(images: torch.Tensor, cols: int, scale: int) -> Image.Image:
    imgs = (to_unit(images) * 255).round().to(torch.uint8)
    n, c, h, w = imgs.shape
    rows = (n + cols - 1) // cols
    canvas = torch.zeros(c, rows * (h + 1), cols * (w + 1), dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        canvas[:, r * (h + 1):r * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = imgs[i]
    mode = "L" if c == 1 else "RGB"
    arr = canvas[0].numpy() if c == 1 else canvas.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr, mode=mode)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST).convert("RGB")


def save_comparison_grid(path: str | Path, columns: dict[str, torch.Tensor], cols: int = 8, scale: int = 4) -> None:
    """``columns`` maps a label (teacher, pruned, student) to images drawn from the same noise."""
    tiles = {label: _tile(images, cols, scale) for label, images in columns.items()}
    gap, header = 16, 20
    width = sum(t.width for t in tiles.values()) + gap * (len(tiles) - 1)
    height = max(t.height for t in tiles.values()) + header
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for label, tile in tiles.items():
        draw.text((x + 4, 4), label, fill="black")
        canvas.paste(tile, (x, header))
        x += tile.width + gap
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())

"""The shapes data set: coloured shapes on a plain background, drawn with PIL from a caption's attributes.

A caption names five attributes, always in one order::

    "two small red triangles at the top left"   -> count, size, colour, shape, position

This module is the one place that knows the grammar: :func:`caption` writes a caption from attributes,
:func:`parse_prompt` reads the attributes back out of a prompt (what prompt accuracy checks an image
against). A few colour / shape pairs are held out of the teacher's training (:data:`HELD_OUT`) to test
composition: the teacher has seen every colour and every shape, never those pairs.

Images are drawn at 4x and downsampled (anti-aliased), and are a pure function of ``(seed, index)``.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 45, 45), "green": (45, 175, 65), "blue": (50, 95, 230), "yellow": (235, 210, 45),
           "purple": (160, 70, 210), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
COUNTS = ("one", "two", "three")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
# The classifier has one head per attribute, in this order; every caption names all five.
ATTRIBUTES: dict[str, tuple[str, ...]] = {"count": COUNTS, "size": SIZES, "colour": tuple(COLOURS),
                                          "shape": SHAPES, "position": POSITIONS}
# Never in the teacher's training data: each colour and each shape still appears in other pairs.
HELD_OUT = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "cross"), ("yellow", "square")})

PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
BACKGROUND = (32, 32, 36)
RESOLUTION = 64
_SUPERSAMPLE = 4
_DIAMETER = {"small": (7.0, 9.0), "large": (12.0, 14.0)}  # pixels at 64x64
_GAP = (3.0, 5.0)          # between neighbouring shapes of a group
_GROUP_JITTER = 3.0        # the group's centre moves this far from its region's centre
_COLOUR_JITTER = 12


@dataclass(frozen=True)
class Attributes:
    count: str
    size: str
    colour: str
    shape: str
    position: str

    def as_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT


def caption(a: Attributes) -> str:
    noun = a.shape if a.count == "one" else PLURALS[a.shape]
    where = "in the center" if a.position == "center" else f"at the {a.position}"
    return f"{a.count} {a.size} {a.colour} {noun} {where}"


_PROMPT = re.compile(
    rf"^(?P<count>{'|'.join(COUNTS)}) (?P<size>{'|'.join(SIZES)}) (?P<colour>{'|'.join(COLOURS)}) "
    rf"(?P<noun>{'|'.join(list(SHAPES) + list(PLURALS.values()))}) "
    rf"(?:in the (?P<center>center)|at the (?P<position>{'|'.join(p for p in POSITIONS if p != 'center')}))$")
_SINGULAR = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}


def parse_prompt(prompt: str) -> Attributes:
    """The attributes a prompt asks for; ``ValueError`` naming the grammar if it is not a shapes caption."""
    m = _PROMPT.match(" ".join(prompt.lower().split()))
    if m is None:
        raise ValueError(f"not a shapes prompt: {prompt!r} (expected e.g. 'two small red triangles at the top left': "
                         f"count size colour shape position)")
    return Attributes(m["count"], m["size"], m["colour"], _SINGULAR[m["noun"]], m["center"] or m["position"])


def all_combinations(held_out: bool | None = None) -> list[Attributes]:
    """Every attribute combination; ``held_out`` True / False keeps only the held-out / trained ones."""
    combos = [Attributes(*values) for values in itertools.product(*ATTRIBUTES.values())]
    return combos if held_out is None else [a for a in combos if a.held_out == held_out]


def vocabulary() -> list[str]:
    """Every word a caption can use: the tokenizer gives each one token."""
    words = {w for c in all_combinations() for w in caption(c).split()}
    return sorted(words)


# ---- drawing ------------------------------------------------------------------------------------

def _region_centre(position: str) -> tuple[float, float]:
    q = RESOLUTION / 4
    return {"top left": (q, q), "top right": (3 * q, q), "bottom left": (q, 3 * q),
            "bottom right": (3 * q, 3 * q), "center": (2 * q, 2 * q)}[position]


def _layout(count: str, spacing: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Offsets of a group's shapes from its centre: a pair in one of four directions, a triangle of three."""
    if count == "one":
        return [(0.0, 0.0)]
    if count == "two":
        angle = rng.choice([0.0, 0.5, 0.25, 0.75]) * math.pi  # horizontal, vertical, the two diagonals
        dx, dy = math.cos(angle) * spacing / 2, math.sin(angle) * spacing / 2
        return [(-dx, -dy), (dx, dy)]
    turn = rng.integers(4) * math.pi / 2  # the triangle points up, right, down or left
    r = spacing / math.sqrt(3)
    return [(r * math.cos(turn + k * 2 * math.pi / 3 - math.pi / 2), r * math.sin(turn + k * 2 * math.pi / 3 - math.pi / 2))
            for k in range(3)]


def _polygon(shape: str, cx: float, cy: float, d: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = 0.85 * d / 2  # a square of side d looks larger than a circle of diameter d
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        r = d / math.sqrt(3) * 1.05  # side about d, centred on its centroid, pointing up
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "cross":
        a, t = d / 2, d / 6
        return [(cx - t, cy - a), (cx + t, cy - a), (cx + t, cy - t), (cx + a, cy - t), (cx + a, cy + t), (cx + t, cy + t),
                (cx + t, cy + a), (cx - t, cy + a), (cx - t, cy + t), (cx - a, cy + t), (cx - a, cy - t), (cx - t, cy - t)]
    return None


def render(a: Attributes, rng: np.random.Generator) -> np.ndarray:
    """One image of ``a``: uint8 array (64, 64, 3). The same generator state always draws the same image."""
    d = rng.uniform(*_DIAMETER[a.size])
    spacing = d + rng.uniform(*_GAP)
    offsets = _layout(a.count, spacing, rng)
    cx, cy = (c + rng.uniform(-_GROUP_JITTER, _GROUP_JITTER) for c in _region_centre(a.position))
    # keep the whole group inside the image
    reach = max(max(abs(ox), abs(oy)) for ox, oy in offsets) + d / 2 + 1
    cx, cy = (min(max(c, reach), RESOLUTION - reach) for c in (cx, cy))
    colour = tuple(int(np.clip(c + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1), 0, 255)) for c in COLOURS[a.colour])
    s = _SUPERSAMPLE
    img = Image.new("RGB", (RESOLUTION * s, RESOLUTION * s), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for ox, oy in offsets:
        x, y = (cx + ox + rng.uniform(-0.5, 0.5)) * s, (cy + oy + rng.uniform(-0.5, 0.5)) * s
        points = _polygon(a.shape, x, y, d * s)
        if points is None:
            draw.ellipse([x - d * s / 2, y - d * s / 2, x + d * s / 2, y + d * s / 2], fill=colour)
        else:
            draw.polygon(points, fill=colour)
    return np.asarray(img.resize((RESOLUTION, RESOLUTION), Image.BOX))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1], as the VAE and the classifier take images."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def sample_attributes(n: int, seed: int, held_out: bool | None = False) -> list[Attributes]:
    """``n`` combinations drawn uniformly (with replacement) from :func:`all_combinations`."""
    combos = all_combinations(held_out)
    picks = np.random.default_rng([seed, 0]).integers(len(combos), size=n)
    return [combos[i] for i in picks]


def render_array(attributes: list[Attributes], seed: int) -> np.ndarray:
    """uint8 (N, 64, 64, 3); image ``i`` is drawn from the generator ``(seed, 1, i)``."""
    return np.stack([render(a, np.random.default_rng([seed, 1, i])) for i, a in enumerate(attributes)])


def render_many(attributes: list[Attributes], seed: int) -> torch.Tensor:
    """:func:`render_array` as float32 (N, 3, 64, 64) in [-1, 1]."""
    return to_tensor(render_array(attributes, seed))


def make_dataset(n: int, seed: int, held_out: bool | None = False) -> tuple[np.ndarray, list[Attributes]]:
    """``n`` rendered images (uint8, see :func:`render_array`) and their attributes.

    ``held_out`` False (the teacher's data) never draws a held-out pair; None draws from every combination.
    """
    attributes = sample_attributes(n, seed, held_out)
    return render_array(attributes, seed), attributes


def evaluation_prompts(per_split: int, seed: int) -> list[str]:
    """``per_split`` distinct trained and as many distinct held-out combinations (at most all), alternating,
    so that the first N prompts of the list cover both splits."""
    rng = np.random.default_rng([seed, 2])
    splits = []
    for held_out in (False, True):
        combos = all_combinations(held_out)
        picks = rng.permutation(len(combos))[:per_split]
        splits.append([caption(combos[i]) for i in picks])
    return [p for pair in itertools.zip_longest(*splits) for p in pair if p is not None]


def distillation_prompts(exclude: list[str]) -> list[str]:
    """Every trained combination not in ``exclude`` (the evaluation prompts): distillation never sees those."""
    excluded = set(exclude)
    return [p for p in (caption(a) for a in all_combinations(held_out=False)) if p not in excluded]

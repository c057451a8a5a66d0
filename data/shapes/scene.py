"""Scenes: 1-8 non-overlapping coloured shapes on a plain background, and their rendering."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

# Visually distinct at ~100 px, including after mtmd's bicubic resize.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 90, 225),
    "yellow": (240, 210, 30),
    "purple": (135, 60, 180),
    "orange": (245, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.075, "large": 0.125}  # radius as a fraction of the side
BACKGROUND = (235, 235, 232)
MAX_OBJECTS = 8
# The 3x3 grid of ShapeObject.region, in reading order: rows top to bottom, each row left to right.
REGIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                            "bottom left", "bottom", "bottom right")
# How captions and reasoning list objects: "left-to-right" (the shipped model) or "regions" (REGIONS
# in turn, left to right inside a region; measured in the README, not shipped).
CAPTION_ORDERS: tuple[str, ...] = ("left-to-right", "regions")
_MARGIN = 0.02  # minimum gap between objects and to the border, as a fraction of the side
_SUPERSAMPLE = 4  # draw large and downsample, for smooth edges


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    size: str
    x: float  # centre, 0 = left edge, 1 = right edge
    y: float  # centre, 0 = top edge, 1 = bottom edge

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    @property
    def region(self) -> str:
        """Where the object sits on a 3x3 grid: "top left", "center", "bottom", ..."""
        col = "left" if self.x < 1 / 3 else ("right" if self.x >= 2 / 3 else "")
        row = "top" if self.y < 1 / 3 else ("bottom" if self.y >= 2 / 3 else "")
        return " ".join(p for p in (row, col) if p) or "center"

    @property
    def name(self) -> str:
        """'large red circle'."""
        return f"{self.size} {self.color} {self.shape}"

    def describe(self) -> str:
        """'a large red circle at the top left'."""
        where = "in the center" if self.region == "center" else f"at the {self.region}"
        return f"a {self.name} {where}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]  # sorted left to right
    caption_order: str = "left-to-right"  # one of CAPTION_ORDERS

    def __post_init__(self):
        if self.caption_order not in CAPTION_ORDERS:
            raise ValueError(f"caption_order must be one of {CAPTION_ORDERS}, got {self.caption_order!r}")

    def listed(self, objs=None) -> list[ShapeObject]:
        """`objs` (default: all) in the order captions and reasoning list them."""
        objs = list(self.objects if objs is None else objs)
        if self.caption_order == "regions":
            return sorted(objs, key=lambda o: (REGIONS.index(o.region), o.x, o.y))
        return objs  # stored order: left to right

    def to_json(self) -> list[dict]:
        return [asdict(o) for o in self.objects]

    @classmethod
    def from_json(cls, data: list[dict]) -> Scene:
        return cls(tuple(ShapeObject(**o) for o in data))


def generate_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    """A random scene; `n_objects` defaults to uniform in 1..MAX_OBJECTS."""
    n = n_objects if n_objects is not None else rng.randint(1, MAX_OBJECTS)
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in 1..{MAX_OBJECTS}, got {n}")
    while True:  # restart the layout in the rare case the canvas fills up
        placed: list[ShapeObject] = []
        for _ in range(n):
            size = rng.choice(list(SIZES))
            r = SIZES[size]
            for _attempt in range(200):
                x = rng.uniform(r + _MARGIN, 1 - r - _MARGIN)
                y = rng.uniform(r + _MARGIN, 1 - r - _MARGIN)
                if all(math.hypot(x - o.x, y - o.y) > r + o.radius + _MARGIN for o in placed):
                    break
            else:
                break
            placed.append(ShapeObject(rng.choice(list(COLORS)), rng.choice(SHAPES), size,
                                      round(x, 4), round(y, 4)))
        if len(placed) == n:
            return Scene(tuple(sorted(placed, key=lambda o: (o.x, o.y))))


def render_scene(scene: Scene, image_size: int = 128) -> Image.Image:
    """Draw the scene as an RGB image of image_size x image_size pixels."""
    big = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = o.x * big, o.y * big, o.radius * big
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            h = r * 0.82  # similar area to the circle
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif o.shape == "triangle":
            pts = [(cx + r * math.cos(a), cy - r * math.sin(a))
                   for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)]
            draw.polygon(pts, fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)

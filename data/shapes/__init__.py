"""The "shapes" world: seeded 2-D scenes and four-stage visual reasoning questions about them."""

from .dataset import ShapesConfig, build_examples, write_dataset
from .questions import FAMILIES, Question, make_question
from .scene import COLORS, SHAPES, SIZES, Scene, ShapeObject, generate_scene, render_scene

__all__ = [
    "COLORS", "FAMILIES", "SHAPES", "SIZES", "Question", "Scene", "ShapeObject", "ShapesConfig",
    "build_examples", "generate_scene", "make_question", "render_scene", "write_dataset",
]

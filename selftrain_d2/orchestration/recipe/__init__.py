"""One command for a whole method: a recipe file lists the stages (teacher, pseudo labels, centroid index,
student, evaluation ...); each runs in its own folder, is cached by a hash of its inputs, and is skipped
when done, so a killed recipe resumes."""
from .errors import RecipeError
from .runner import run_recipe, stage_hash
from .spec import Recipe, StageSpec, load_recipe, parse_recipe
from .stages import STAGE_REGISTRY, RecipeContext, Stage

__all__ = [
    "run_recipe",
    "stage_hash",
    "Recipe",
    "RecipeError",
    "StageSpec",
    "load_recipe",
    "parse_recipe",
    "STAGE_REGISTRY",
    "RecipeContext",
    "Stage",
]

"""The error of a recipe that cannot run as written."""

__all__ = ["RecipeError"]


class RecipeError(ValueError):
    """A recipe file that cannot run as written; the message names the file, stage and key."""

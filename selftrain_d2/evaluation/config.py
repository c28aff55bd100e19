"""Config keys of evaluation."""
from ..config import register_config

__all__ = ["add_evaluation_config"]


@register_config
def add_evaluation_config(cfg):
    """TEST.* keys of the evaluators."""
    # Ground-truth ids outside the classes and the ignore value in sem_seg evaluation: "error" names the file
    # and the ids; "ignore" evaluates their pixels as ignore, counts them and warns once.
    cfg.TEST.INVALID_LABEL_IDS = "error"

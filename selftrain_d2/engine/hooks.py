"""Training hooks shared by every trainer of the package."""
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.build import mix_seed

__all__ = ["StepSeeder"]


class StepSeeder(HookBase):
    """Seeds torch's RNG before each step from (run seed, iteration, rank).

    Dropout, drop-path and any other torch randomness of step ``i`` then depend on ``i`` alone,
    not on what ran before, so a resumed run repeats the uninterrupted one. The run seed is part
    of the checkpoint.
    """

    def __init__(self, seed):
        self.seed = int(seed)

    def before_step(self):
        torch.manual_seed(mix_seed(self.seed, self.trainer.iter, comm.get_rank()))

    def state_dict(self):
        return {"seed": self.seed}

    def load_state_dict(self, state_dict):
        self.seed = int(state_dict["seed"])

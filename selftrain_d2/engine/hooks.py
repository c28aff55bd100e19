"""Training hooks shared by every trainer of the package."""
import logging

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.build import mix_seed

__all__ = ["StepSeeder", "CropScheduleHook"]


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


class CropScheduleHook(HookBase):
    """Reports the crop-size schedule's position (epoch, crop, batch, rate factor) every step and keeps it
    in the checkpoint. The schedule itself is a pure function of the iteration (EpochTable), so a resumed
    run continues at the same crop, batch and learning rate; the saved position is checked against it."""

    def __init__(self, table):
        self.table = table

    def _position(self, iteration):
        e = self.table.at_iter(iteration)
        return {"epoch": e.epoch, "crop": list(e.crop), "batch": e.batch, "lr_factor": e.lr_factor}

    def before_step(self):
        p = self._position(self.trainer.iter)
        storage = self.trainer.storage
        storage.put_scalars(crop_epoch=p["epoch"], crop_height=p["crop"][0], crop_batch=p["batch"],
                            smoothing_hint=False)

    def state_dict(self):
        # The position of the next iteration to run (what a resumed run starts at).
        return {"iteration": self.trainer.iter + 1, **self._position(self.trainer.iter + 1)}

    def load_state_dict(self, state_dict):
        expected = self._position(state_dict["iteration"])
        saved = {k: state_dict[k] for k in expected}
        if saved != expected:
            logging.getLogger(__name__).warning(
                f"the checkpoint was at crop-schedule position {saved} but this config's schedule gives "
                f"{expected} at iteration {state_dict['iteration']}: INPUT.CROP_SCHEDULE or the data changed; "
                "continuing with this config's schedule")

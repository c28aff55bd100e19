"""What several test modules share that is not a fixture (fixtures are in conftest.py): fake teachers whose
labels are known exactly, the kill-and-resume helpers of training tests, and running commands as if on
several machines."""
import subprocess
import tempfile
import time

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Instances

from selftrain_d2.config import get_selftrain_cfg
from selftrain_d2.pseudo_labels import register_teacher_output

from .conftest import ROOT

# ------------------------------------------------------------------------------------------- fake teachers

EPS = 1.0  # added to every colour channel so that no class score is 0


class ColourTeacher(torch.nn.Module):
    """Per-pixel class scores = RGB value + EPS (3 classes): pointwise, so labels are known exactly."""

    def __init__(self, cfg=None):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, batched_inputs):
        self.calls += 1
        return [{"sem_seg": (x["image"].float() + EPS) * self.scale} for x in batched_inputs]


class BoxTeacher(torch.nn.Module):
    """Two fixed instances: a 2x3 box of class 1 (score 0.9) and a 1x1 box of class 0 (score 0.3)."""

    def __init__(self, cfg=None):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, batched_inputs):
        x = batched_inputs[0]
        h, w = x["height"], x["width"]
        masks = torch.zeros(2, h, w)
        masks[0, 1:3, 2:5] = 1
        masks[1, 0, 0] = 1
        inst = Instances((h, w))
        inst.pred_masks, inst.scores, inst.pred_classes = masks, torch.tensor([0.9, 0.3]), torch.tensor([1, 0])
        return [{"instances": inst}]


for _cls in (ColourTeacher, BoxTeacher):
    if _cls.__name__ not in META_ARCH_REGISTRY:
        META_ARCH_REGISTRY.register(_cls)
register_teacher_output("ColourTeacher", "semantic", "scores")
register_teacher_output("BoxTeacher", "instance")


def colour_probs(image_rgb):
    """ColourTeacher's class probabilities [3, H, W] of an HWC RGB image."""
    scores = image_rgb.astype(np.float64).transpose(2, 0, 1) + EPS
    return scores / scores.sum(0, keepdims=True)


def pseudo_label_cfg(arch="ColourTeacher", *opts):
    """A config labelling with the fake teacher ``arch`` (3 classes, RGB, images at their own size)."""
    cfg = get_selftrain_cfg()
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", arch, "MODEL.DEVICE", "cpu", "INPUT.FORMAT", "RGB", "INPUT.MIN_SIZE_TEST", "0",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3", *opts,
    ])
    return cfg



# ------------------------------------------------------------------------------------------- guided distillation

# A Mask2Former small enough for a few CPU iterations in seconds; pseudo labels kept at any confidence.
TINY_MASK2FORMER = [
    "MODEL.EFFICIENTNET_LITE.PRETRAINED", "False", "SOLVER.IMS_PER_BATCH", "1", "SEMISUP.UNLABELED_IMS_PER_BATCH", "1",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.CROP.SIZE", "(64, 96)", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
    "MODEL.MASK_FORMER.DEC_LAYERS", "2", "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8", "DATASETS.TEST", "()", "SEMISUP.ONLINE_PSEUDO_LABELS.SCORE_THRESHOLD", "0.0",
    "SEMISUP.EMA_DECAY", "0.5", "SOLVER.CHECKPOINT_PERIOD", "100", "DATALOADER.NUM_WORKERS", "0",
]


# ------------------------------------------------------------------------------------------- kill and resume

class Killed(Exception):
    pass


class KillAfter(HookBase):
    """Stops training after ``n`` iterations, as a kill would (checkpoint hooks have run)."""

    def __init__(self, n):
        self.n = n

    def after_step(self):
        if self.trainer.iter + 1 == self.n:
            raise Killed()


def trainer_state(trainer):
    return {
        "iter": trainer.iter,
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
    }


def assert_same_state(a, b):
    assert a["iter"] == b["iter"]
    assert a["scheduler"] == b["scheduler"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"], rtol=0, atol=0)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]



# ------------------------------------------------------------------------------------------- several machines

def run_together(commands, timeout):
    """Start every command at once (as processes on several machines); their exit codes and outputs once all
    have ended, or been killed at ``timeout`` seconds."""
    logs = [tempfile.TemporaryFile("w+") for _ in commands]  # a pipe nobody reads until the end could fill up
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT) for cmd, log in zip(commands, logs)]
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            p.kill()
            p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return [p.returncode for p in procs], outputs, [p.pid for p in procs]

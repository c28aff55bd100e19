import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "2")

DEMO_CONFIG = os.path.join(ROOT, "configs", "demo", "deeplabv3plus-effnetlite0.yaml")
GD_STUDENT_CONFIG = os.path.join(ROOT, "configs", "demo", "guided-distillation-student.yaml")

# A DeepLabV3+ small enough for a few CPU iterations in seconds.
FAST_TRAIN_OPTS = [
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "4",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.CHECKPOINT_PERIOD", "2",
    "DATALOADER.NUM_WORKERS", "0",
    "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "32",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
    "MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS", "[16]",
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
]


@pytest.fixture
def fast_cfg(tmp_path):
    """Build the demo config with FAST_TRAIN_OPTS and extra ``KEY VALUE`` overrides, in tmp_path."""
    from selftrain_d2.config import load_config

    def make(*opts):
        cfg = load_config(DEMO_CONFIG, FAST_TRAIN_OPTS + ["OUTPUT_DIR", str(tmp_path / "out")] + list(opts))
        cfg.freeze()
        return cfg

    return make


@pytest.fixture
def new_name():
    """Unique dataset names, removed (with their "_unlabeled" twins) from the catalogs afterwards."""
    import uuid

    from detectron2.data import DatasetCatalog, MetadataCatalog

    made = []

    def make(prefix="ds"):
        name = f"test_{prefix}_{uuid.uuid4().hex[:8]}"
        made.extend([name, name + "_unlabeled"])
        return name

    yield make
    for name in made:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


@pytest.fixture
def images(tmp_path):
    """A folder of 5 random 6x10 RGB PNGs (one in a subfolder) plus one corrupt file."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for i in range(5):
        rel = f"sub/img{i}.png" if i == 4 else f"img{i}.png"
        arr = rng.integers(0, 256, size=(6, 10, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / rel)
        arrays[os.path.splitext(rel)[0]] = arr
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder, arrays


@pytest.fixture
def one_thread():
    """torch on one thread for the test (module: ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    # Tiny models on a shared 2-core machine run several times faster on one thread than on two.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    """A 'trained teacher' checkpoint for guided distillation: a freshly initialised tiny Mask2Former of the demo
    student's config (helpers.TINY_MASK2FORMER), seeded."""
    from detectron2.modeling import build_model

    from selftrain_d2.config import load_config

    from .helpers import TINY_MASK2FORMER

    cfg = load_config(GD_STUDENT_CONFIG, TINY_MASK2FORMER)
    torch.manual_seed(123)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pth")
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return path

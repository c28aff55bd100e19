import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "2")

DEMO_CONFIG = os.path.join(ROOT, "configs", "demo", "deeplabv3plus-effnetlite0.yaml")

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

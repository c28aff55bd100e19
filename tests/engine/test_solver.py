"""build_optimizer: parameter groups, optimizers and gradient clipping, on small models."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer as d2_build_optimizer
from torch import nn

from selftrain_d2.config import get_selftrain_cfg, load_config
from selftrain_d2.solver import build_gradient_clipper, build_optimizer, build_param_groups

from ..conftest import DEMO_CONFIG


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.backbone.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
        self.backbone.pos_embed = nn.Parameter(torch.zeros(1, 4, 2))
        self.head = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.GroupNorm(2, 4))
        self.query_embed = nn.Embedding(5, 4)
        self.level_embed = nn.Parameter(torch.zeros(3, 4))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _cfg(*opts):
    cfg = get_selftrain_cfg()
    cfg.merge_from_list(["SOLVER.BASE_LR", "0.1", "SOLVER.WEIGHT_DECAY", "0.05", "SOLVER.WEIGHT_DECAY_NORM", "0.01",
                         "SOLVER.WEIGHT_DECAY_EMBED", "0.002", "SOLVER.BACKBONE_MULTIPLIER", "0.5", *opts])
    return cfg


def _hyper(optimizer, model):
    """name -> (lr, weight_decay) of every parameter the optimizer holds."""
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_param_groups_follow_the_reference_recipe():
    model = _Tiny()
    opt = build_optimizer(_cfg("SOLVER.OPTIMIZER", "ADAMW"), model)
    assert isinstance(opt, torch.optim.AdamW)
    h = _hyper(opt, model)
    assert h["backbone.0.weight"] == (0.05, 0.05)  # backbone lr x multiplier
    assert h["backbone.1.weight"] == (0.05, 0.01) and h["backbone.1.bias"] == (0.05, 0.01)  # BN: norm decay
    assert h["backbone.relative_position_bias_table"] == h["backbone.pos_embed"] == (0.05, 0.002)
    assert h["head.0.weight"] == (0.1, 0.05)
    assert h["head.1.weight"] == (0.1, 0.01) and h["head.2.bias"] == (0.1, 0.01)  # LayerNorm, GroupNorm
    assert h["query_embed.weight"] == (0.1, 0.002)  # nn.Embedding
    assert h["level_embed"] == (0.1, 0.05)  # a bare parameter keeps the default decay, as in the reference
    assert "frozen.weight" not in h
    assert len(h) == sum(p.requires_grad for p in model.parameters())
    assert len(opt.param_groups) == len({v for v in h.values()})  # merged by hyper-parameters


def test_shared_parameters_are_optimised_once():
    model = _Tiny()
    model.head[0].weight = model.backbone.relative_position_bias_table = nn.Parameter(torch.zeros(4, 4))
    groups = build_param_groups(model, base_lr=1.0, weight_decay=0.0, weight_decay_norm=0.0, weight_decay_embed=0.0)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == sum(p.requires_grad for p in model.parameters())


def test_sgd_with_multiplier_one_equals_detectron2s_optimizer():
    cfg = load_config(DEMO_CONFIG, ["MODEL.EFFICIENTNET_LITE.PRETRAINED", "False", "SOLVER.OPTIMIZER", "SGD",
                                    "SOLVER.BACKBONE_MULTIPLIER", "1.0", "SOLVER.WEIGHT_DECAY_NORM", "0.0"])
    model = build_model(cfg)
    ours, theirs = build_optimizer(cfg, model), d2_build_optimizer(cfg, model)
    assert type(ours) is type(theirs) is torch.optim.SGD
    assert _hyper(ours, model) == _hyper(theirs, model)
    for a, b in zip(ours.param_groups, theirs.param_groups):
        assert _settings(a) == _settings(b)  # the kernels differ: same updates, see the test below


@pytest.mark.parametrize("optimizer", ["SGD", "ADAMW"])
def test_fused_kernels_on_the_cpu_update_as_the_default_loop(optimizer):
    torch.manual_seed(0)
    model = _Tiny()
    reference = _Tiny()
    reference.load_state_dict(model.state_dict())
    initial = [p.detach().clone() for p in model.parameters()]
    cfg = _cfg("SOLVER.OPTIMIZER", optimizer)
    ours = build_optimizer(cfg, model)
    assert ours.defaults["fused"] is True
    plain = type(ours)([{**g, "params": [dict(reference.named_parameters())[n] for n in names]}
                        for g, names in _group_names(ours, model)], lr=cfg.SOLVER.BASE_LR, foreach=False)
    for _ in range(3):
        gradients = {n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
        for m, opt in ((model, ours), (reference, plain)):
            for n, p in m.named_parameters():
                p.grad = gradients.get(n)
            opt.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not any(torch.equal(a, b) for a, b in zip(model.parameters(), initial) if a.requires_grad)


def _settings(group):
    """A parameter group's hyper-parameters, without its parameters and the choice of kernel."""
    return {k: v for k, v in group.items() if k not in ("params", "foreach", "fused")}


def _group_names(optimizer, model):
    names = {p: n for n, p in model.named_parameters()}
    return [(_settings(g), [names[p] for p in g["params"]]) for g in optimizer.param_groups]


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER='ADAM'"):
        build_optimizer(_cfg("SOLVER.OPTIMIZER", "ADAM"), _Tiny())


def _clip_with_gradient(cfg, model, value):
    """Gradients of ``value`` everywhere, clipped as the train step clips them; returns the optimizer."""
    for p in model.parameters():
        p.grad = torch.full_like(p, value) if p.requires_grad else None
    clip = build_gradient_clipper(cfg)
    if clip is not None:
        clip([p for p in model.parameters() if p.requires_grad])
    return clip


@pytest.mark.parametrize("optimizer", ["SGD", "ADAMW"])
def test_full_model_clipping_clips_the_norm_of_all_gradients_together(optimizer):
    model = _Tiny()
    cfg = _cfg("SOLVER.OPTIMIZER", optimizer, "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
               "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.01")
    # Clipping belongs to the train step (after the GradScaler's unscale_), not to the optimizer.
    assert type(build_optimizer(cfg, model)) is (torch.optim.SGD if optimizer == "SGD" else torch.optim.AdamW)
    _clip_with_gradient(cfg, model, 3.0)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert total == pytest.approx(0.01, rel=1e-4)
    # Every gradient is scaled by the same factor (per-parameter clipping would not keep ratios).
    assert len({round(float(g.flatten()[0]), 9) for g in grads}) == 1


def test_detectron2_value_clipping_is_kept_for_other_clip_types():
    model = _Tiny()
    cfg = _cfg("SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "value",
               "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.5")
    _clip_with_gradient(cfg, model, 3.0)
    assert all(float(p.grad.abs().max()) == 0.5 for p in model.parameters() if p.grad is not None)


def test_unknown_clip_type_is_refused_by_name():
    cfg = _cfg("SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "global")
    with pytest.raises(ValueError, match="global"):
        build_gradient_clipper(cfg)


def test_no_clipping_unless_enabled():
    model = _Tiny()
    cfg = _cfg("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model")
    assert type(build_optimizer(cfg, model)) is torch.optim.SGD
    assert _clip_with_gradient(cfg, model, 3.0) is None
    assert all(float(p.grad.abs().max()) == 3.0 for p in model.parameters() if p.grad is not None)

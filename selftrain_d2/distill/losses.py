"""Knowledge-distillation losses for semantic segmentation, chosen by name from ``KD_LOSS_REGISTRY``.

The maths are pure functions on tensors (``pixel_kd_loss``, ``channel_wise_kd_loss``,
``pairwise_similarity_loss``, ``intra_class_variation_loss``, the Wasserstein critic / generator terms);
each registered class is a thin ``nn.Module`` around one of them, built from ``cfg.DISTILL.<NAME>``.

A loss module declares which named taps it reads (``taps``), which of them must have the teacher's
channel count on the student side (``adapted_taps``: the distiller adds a learned 1x1 adapter where they
differ) and whether it needs the input images. ``forward(student, teacher, inputs)`` gets the tapped
maps (already resized to a common size) and a :class:`KDInputs`, and returns ``{"loss_kd_<name>": ...}``.

Adding a loss is one registered class; its settings (``cfg.DISTILL.MY_KD``) and their defaults are declared
with it and added to the config by ``add_distill_config``::

    @register_kd_loss("my_kd", WEIGHT=1.0, TAP="logits")
    class MyKD(KDLoss):
        @configurable
        def __init__(self, *, weight, tap): ...
        @classmethod
        def from_config(cls, cfg):
            c = cls.settings(cfg)  # cfg.DISTILL.MY_KD
            return {"weight": c.WEIGHT, "tap": cls.tap(c)}
        def forward(self, student, teacher, inputs): ...
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils.events import get_event_storage
from torch import nn
from torch.func import functional_call

from ..utils.registry import NamedRegistry

__all__ = [
    "KD_LOSS_REGISTRY",
    "register_kd_loss",
    "KDLoss",
    "KDInputs",
    "PixelKD",
    "ChannelWiseKD",
    "PairwiseSimilarityKD",
    "IntraClassVariationKD",
    "HolisticKD",
    "Discriminator",
    "adam_update_",
    "build_kd_losses",
    "channel_wise_kd_loss",
    "gradient_penalty",
    "intra_class_variation_loss",
    "node_patch",
    "pairwise_similarity_loss",
    "pixel_kd_loss",
    "prototype_similarity",
    "wasserstein_critic_loss",
    "wasserstein_generator_loss",
]

KD_LOSS_REGISTRY = NamedRegistry("KD_LOSS")
KD_LOSS_REGISTRY.__doc__ = "Knowledge-distillation losses, built from cfg.DISTILL by name (cfg.DISTILL.LOSSES)."


# --------------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------------
def pixel_kd_loss(student_logits, teacher_logits, tau=1.0, ignore_mask=None):
    """Pixel-wise KD: ``KL(softmax(t / tau) || softmax(s / tau))`` per pixel, times ``tau**2``, averaged
    over the pixels where ``ignore_mask`` (N x H x W, True = ignore) is False (all pixels when None).

    ``student_logits`` and ``teacher_logits``: N x C x H x W. Returns 0 (with a graph) when every pixel
    is ignored.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"pixel KD needs equal shapes, got student {tuple(student_logits.shape)} "
                         f"and teacher {tuple(teacher_logits.shape)}")
    log_p_s = F.log_softmax(student_logits / tau, dim=1)
    log_p_t = F.log_softmax(teacher_logits / tau, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)  # N x H x W
    if ignore_mask is None:
        return kl.mean() * tau**2
    valid = ~ignore_mask
    return (kl * valid).sum() / valid.sum().clamp(min=1) * tau**2


def channel_wise_kd_loss(student_map, teacher_map, tau=1.0):
    """Channel-wise distillation (Shu et al., 2021): each channel's map is a distribution over spatial
    positions (softmax of ``map / tau``); ``KL(teacher || student)`` per channel, times ``tau**2``, averaged
    over the N x C channels. Maps: N x C x H x W with equal shapes."""
    if student_map.shape != teacher_map.shape:
        raise ValueError(f"channel-wise KD needs equal shapes, got student {tuple(student_map.shape)} "
                         f"and teacher {tuple(teacher_map.shape)}")
    n, c = student_map.shape[:2]
    log_p_s = F.log_softmax(student_map.reshape(n * c, -1) / tau, dim=1)
    log_p_t = F.log_softmax(teacher_map.reshape(n * c, -1) / tau, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean() * tau**2


def _pairwise_similarity(feat):
    """N x M x M cosine similarities between the M spatial positions of an N x C x H x W map."""
    flat = feat.flatten(2)
    flat = flat / (flat.norm(dim=1, keepdim=True) + 1e-8)
    return flat.transpose(1, 2) @ flat


def node_patch(size, scale):
    """(ph, pw) cell size of structured KD's pooling for a map of ``size`` (H, W) at pool ``scale``: the
    original's ``int(side x scale)`` per side (at least 1), so 0.5 gives 2 x 2 nodes on an even-sized map."""
    return tuple(max(1, int(side * scale)) for side in size)


def pairwise_similarity_loss(student_feat, teacher_feat, patch=1, pool="max"):
    """Pair-wise distillation (Liu et al., structured KD): the maps are pooled over ``patch`` cells (an int
    or (ph, pw); ``pool`` "max" or "avg", partial cells kept), every pair of cells gets the cosine similarity
    of its feature vectors, and the loss is the mean squared difference of the student's and the teacher's
    M x M similarity matrices. Channel counts may differ; spatial sizes must match."""
    if student_feat.shape[-2:] != teacher_feat.shape[-2:]:
        raise ValueError(f"pair-wise KD needs equal spatial sizes, got {tuple(student_feat.shape[-2:])} "
                         f"and {tuple(teacher_feat.shape[-2:])}")
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    if max(patch) > 1:
        pooling = {"max": F.max_pool2d, "avg": F.avg_pool2d}[pool]
        student_feat = pooling(student_feat, patch, patch, ceil_mode=True)
        teacher_feat = pooling(teacher_feat, patch, patch, ceil_mode=True)
    diff = _pairwise_similarity(student_feat) - _pairwise_similarity(teacher_feat)
    return (diff**2).mean()


def prototype_similarity(feat, labels, num_classes):
    """Cosine similarity of each pixel's feature to its class prototype (the mean feature of that class's
    pixels in the same image). ``feat``: N x C x H x W, ``labels``: N x H x W (ids outside
    ``0..num_classes-1`` are ignored and get similarity 0). Returns N x H x W."""
    n, c = feat.shape[:2]
    valid = (labels >= 0) & (labels < num_classes)
    ids = torch.where(valid, labels, torch.zeros_like(labels)).flatten(1)  # N x HW
    onehot = F.one_hot(ids, num_classes).to(feat.dtype) * valid.flatten(1, 2).unsqueeze(-1)  # N x HW x K
    flat = feat.flatten(2)  # N x C x HW
    sums = flat @ onehot  # N x C x K
    prototypes = sums / onehot.sum(dim=1, keepdim=True).clamp(min=1)
    per_pixel = torch.gather(prototypes, 2, ids.unsqueeze(1).expand(n, c, -1))  # N x C x HW
    sim = F.cosine_similarity(flat, per_pixel, dim=1, eps=1e-8)
    return (sim * valid.flatten(1)).reshape(labels.shape)


def intra_class_variation_loss(student_feat, teacher_feat, labels, num_classes):
    """IFVD (Wang et al., 2020): the mean squared difference, over all N x H x W pixels as the original,
    between the student's and the teacher's pixel-to-class-prototype cosine similarity maps
    (:func:`prototype_similarity`). Unlabelled pixels add 0 (the original compares each such pixel with
    itself: similarity 1 on both sides) but count in the mean. Channel counts may differ; spatial sizes
    must match ``labels`` (N x H x W)."""
    diff = prototype_similarity(student_feat, labels, num_classes) - prototype_similarity(
        teacher_feat, labels, num_classes
    )
    return (diff**2).mean()


def wasserstein_critic_loss(critic_real, critic_fake):
    """The critic's Wasserstein loss: ``E[D(fake)] - E[D(real)]`` (teacher maps are real, student maps fake)."""
    return critic_fake.mean() - critic_real.mean()


def wasserstein_generator_loss(critic_fake):
    """The student's adversarial loss: ``-E[D(fake)]``."""
    return -critic_fake.mean()


def gradient_penalty(critic, real, fake, generator=None):
    """WGAN-GP (Gulrajani et al.): ``E[(||grad_x D(x)||_2 - 1)^2]`` at random interpolations ``x`` of
    ``real`` and ``fake`` (N x ...), with a graph for back-propagation into ``critic``'s parameters."""
    alpha = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), device=real.device, dtype=real.dtype,
                       generator=generator)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


@torch.no_grad()
def adam_update_(param, grad, exp_avg, exp_avg_sq, step, lr, betas=(0.9, 0.999), eps=1e-8):
    """Adam's (Kingma & Ba) update number ``step`` (1, 2, ...) of ``param``, in place, bias-corrected;
    the moment estimates ``exp_avg`` and ``exp_avg_sq`` are updated in place too."""
    t = float(step)
    exp_avg.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    denom = (exp_avg_sq / (1 - betas[1] ** t)).sqrt_().add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - betas[0] ** t))


# --------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------
class KDInputs:
    """What a KD loss may need besides the tapped maps: the ground-truth labels (the student's own
    targets, 255 = ignore) and the normalised images, both padded like the student's batch, resized
    on request (labels by nearest neighbour, images bilinearly)."""

    def __init__(self, labels=None, images=None, ignore_value=255, num_classes=None):
        self.labels, self.images = labels, images
        self.ignore_value, self.num_classes = ignore_value, num_classes

    def labels_at(self, size):
        if self.labels is None:
            raise ValueError("this KD loss needs ground-truth labels ('sem_seg' in every training input)")
        if tuple(self.labels.shape[-2:]) == tuple(size):
            return self.labels
        return F.interpolate(self.labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()

    def ignore_mask_at(self, size):
        return self.labels_at(size) == self.ignore_value

    def images_at(self, size):
        if self.images is None:
            raise ValueError("this KD loss needs the input images")
        return F.interpolate(self.images, size=tuple(size), mode="bilinear", align_corners=False)


class KDLoss(nn.Module):
    """Base class: ``name`` (the registry name; the settings are ``cfg.DISTILL.<NAME>``), ``taps`` read,
    ``adapted_taps`` that need the teacher's channel count on the student side, ``needs_images``."""

    name = "kd"
    config_defaults = {}  # the keys of cfg.DISTILL.<NAME> and their defaults (register_kd_loss sets them)
    taps = ()
    adapted_taps = ()
    needs_images = False

    def output_name(self):
        return f"loss_kd_{self.name}"

    @classmethod
    def settings(cls, cfg):
        """This loss's config node, ``cfg.DISTILL.<NAME>``."""
        return cfg.DISTILL[cls.name.upper()]

    @classmethod
    def tap(cls, settings):
        """The tap named by ``settings.TAP`` (an error naming the key when empty)."""
        if not settings.TAP:
            raise ValueError(f"DISTILL.{cls.name.upper()}.TAP is empty: name one of DISTILL.TAPS for the "
                             f"{cls.name} loss")
        return settings.TAP


def register_kd_loss(name, **defaults):
    """Class decorator: register a :class:`KDLoss` as ``name`` (for ``cfg.DISTILL.LOSSES``) with the keys of
    its settings, ``cfg.DISTILL.<NAME>`` (``name`` in upper case), and their defaults."""
    def deco(cls):
        cls.name, cls.config_defaults = name, dict(defaults)
        return KD_LOSS_REGISTRY.register(name)(cls)

    return deco


# KL(teacher || student) of tau-softened class distributions per pixel, x tau^2.
@register_kd_loss("pixel_kd", WEIGHT=1.0, TAU=1.0, TAP="logits")
class PixelKD(KDLoss):
    """Pixel-wise KD on class scores (:func:`pixel_kd_loss`); ignore pixels come from the ground truth."""

    @configurable
    def __init__(self, *, weight, tau, tap="logits"):
        super().__init__()
        self.weight, self.tau, self.tap = weight, tau, tap
        self.taps = (tap,)

    @classmethod
    def from_config(cls, cfg):
        c = cls.settings(cfg)
        return {"weight": c.WEIGHT, "tau": c.TAU, "tap": cls.tap(c)}

    def forward(self, student, teacher, inputs):
        s, t = student[self.tap], teacher[self.tap]
        ignore = inputs.ignore_mask_at(s.shape[-2:]) if inputs.labels is not None else None
        return {self.output_name(): self.weight * pixel_kd_loss(s, t, self.tau, ignore)}


# Channel-wise distillation (Shu et al.): spatial softmax per channel, KL, x tau^2.
@register_kd_loss("cwd", WEIGHT=1.0, TAU=4.0, TAP="logits")
class ChannelWiseKD(KDLoss):
    """Channel-wise distillation (:func:`channel_wise_kd_loss`) on class scores or features; a student
    tap with another channel count than the teacher's goes through a 1x1 adapter."""

    @configurable
    def __init__(self, *, weight, tau, tap="logits"):
        super().__init__()
        self.weight, self.tau, self.tap = weight, tau, tap
        self.taps = self.adapted_taps = (tap,)

    @classmethod
    def from_config(cls, cfg):
        c = cls.settings(cfg)
        return {"weight": c.WEIGHT, "tau": c.TAU, "tap": cls.tap(c)}

    def forward(self, student, teacher, inputs):
        loss = channel_wise_kd_loss(student[self.tap], teacher[self.tap], self.tau)
        return {self.output_name(): self.weight * loss}


# Pair-wise similarity distillation (Liu et al.) on pooled cells. POOL_SCALE: cell side as a share of the map's
# side, int(side x scale), before the similarities: the original's pool scale (0.5: 2x2 nodes on an even-sized
# map); 0 = cells of PATCH tap pixels instead (PATCH 1 = the per-pixel variant). POOL: "max" (the original) or
# "avg".
@register_kd_loss("skd", WEIGHT=1.0, TAP="features", POOL_SCALE=0.5, PATCH=1, POOL="max")
class PairwiseSimilarityKD(KDLoss):
    """Pair-wise similarity distillation of structured KD (:func:`pairwise_similarity_loss`)."""

    @configurable
    def __init__(self, *, weight, tap="features", pool_scale=0.5, patch=1, pool="max"):
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"DISTILL.SKD.POOL={pool!r}: use 'max' or 'avg'")
        if not 0 <= pool_scale <= 1:
            raise ValueError(f"DISTILL.SKD.POOL_SCALE={pool_scale}: a share of the map's side, 0 < scale <= 1 "
                             "(0: fixed cells of DISTILL.SKD.PATCH)")
        if pool_scale > 0 and patch != 1:
            raise ValueError(f"DISTILL.SKD.PATCH={patch} is used only with DISTILL.SKD.POOL_SCALE 0 (it is "
                             f"{pool_scale}): set one of them")
        if patch < 1:
            raise ValueError(f"DISTILL.SKD.PATCH={patch}: a cell size of at least 1 tap pixel")
        self.weight, self.tap, self.pool_scale, self.patch, self.pool = weight, tap, pool_scale, patch, pool
        self.taps = (tap,)

    @classmethod
    def from_config(cls, cfg):
        c = cls.settings(cfg)
        return {"weight": c.WEIGHT, "tap": cls.tap(c), "pool_scale": c.POOL_SCALE, "patch": c.PATCH, "pool": c.POOL}

    def forward(self, student, teacher, inputs):
        s, t = student[self.tap], teacher[self.tap]
        patch = node_patch(t.shape[-2:], self.pool_scale) if self.pool_scale > 0 else self.patch
        loss = pairwise_similarity_loss(s, t, patch, self.pool)
        return {self.output_name(): self.weight * loss}


# Intra-class feature variation distillation (Wang et al.), averaged over all pixels.
@register_kd_loss("ifvd", WEIGHT=1.0, TAP="features")
class IntraClassVariationKD(KDLoss):
    """Intra-class feature variation distillation (:func:`intra_class_variation_loss`); class prototypes
    are taken with the ground-truth labels at the tap's resolution."""

    @configurable
    def __init__(self, *, weight, num_classes, tap="features"):
        super().__init__()
        self.weight, self.num_classes, self.tap = weight, num_classes, tap
        self.taps = (tap,)

    @classmethod
    def from_config(cls, cfg):
        c = cls.settings(cfg)
        return {"weight": c.WEIGHT, "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, "tap": cls.tap(c)}

    def forward(self, student, teacher, inputs):
        s, t = student[self.tap], teacher[self.tap]
        labels = inputs.labels_at(s.shape[-2:])
        return {self.output_name(): self.weight * intra_class_variation_loss(s, t, labels, self.num_classes)}


class Discriminator(nn.Module):
    """A fully convolutional critic: stride-2 3x3 convs with LeakyReLU, a 1x1 conv to one channel,
    averaged over positions: one score per image."""

    def __init__(self, in_channels, channels=(64, 128, 256)):
        super().__init__()
        layers, prev = [], in_channels
        for ch in channels:
            layers += [nn.Conv2d(prev, ch, 3, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            prev = ch
        layers.append(nn.Conv2d(prev, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).mean(dim=(1, 2, 3))


# Adversarial (Wasserstein) distillation of class-probability maps (Liu et al.). WEIGHT: of the student's
# adversarial term (the critic's scores are unbounded); CONDITION_ON_IMAGE: the normalised image concatenated to
# the critic's input maps; CHANNELS: the critic's stride-2 conv widths; LR / BETAS: its own Adam optimizer;
# GP_WEIGHT: gradient penalty (WGAN-GP; 0 = off); CRITIC_STEPS: critic updates per training iteration.
@register_kd_loss("holistic", WEIGHT=0.1, TAP="logits", CONDITION_ON_IMAGE=True, CHANNELS=[64, 128, 256], LR=0.0004,
                  BETAS=[0.9, 0.99], GP_WEIGHT=10.0, CRITIC_STEPS=1)
class HolisticKD(KDLoss):
    """Holistic (adversarial) distillation of structured KD: a Wasserstein critic learns to tell the
    teacher's class-probability maps (optionally with the image) from the student's, and the student is
    trained to raise the critic's score of its own maps.

    The critic has its own optimizer (Adam) and takes one step inside this module's training forward, on
    detached maps, before the student's term is computed. Keeping it here, rather than in a hook or a second
    optimizer in the trainer, leaves the train step Detectron2's own (one forward, one backward, one
    optimizer step for the student) and puts everything the critic needs to resume into the model's
    ``state_dict``: its weights are parameters and the Adam moments and step count are buffers, so the
    student's checkpoint saves and restores them. The critic's parameters never require grad, so the
    student's optimizer (trainable parameters only) and DDP skip them; the critic's step takes its
    gradients through ``torch.func.functional_call`` and averages them over processes itself.
    """

    @configurable
    def __init__(self, *, weight, num_classes, tap="logits", condition_on_image=True, channels=(64, 128, 256),
                 lr=4e-4, betas=(0.9, 0.99), gp_weight=10.0, critic_steps=1):
        super().__init__()
        self.weight, self.tap, self.condition_on_image = weight, tap, condition_on_image
        self.lr, self.betas, self.gp_weight, self.critic_steps = lr, tuple(betas), gp_weight, critic_steps
        self.taps = (tap,)
        self.needs_images = condition_on_image
        self.discriminator = Discriminator(num_classes + (3 if condition_on_image else 0), tuple(channels))
        for p in self.discriminator.parameters():
            p.requires_grad_(False)
        for i, p in enumerate(self.discriminator.parameters()):
            self.register_buffer(f"adam_exp_avg_{i}", torch.zeros_like(p))
            self.register_buffer(f"adam_exp_avg_sq_{i}", torch.zeros_like(p))
        self.register_buffer("adam_step", torch.zeros(()))

    @classmethod
    def from_config(cls, cfg):
        c = cls.settings(cfg)
        return {
            "weight": c.WEIGHT,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "tap": cls.tap(c),
            "condition_on_image": c.CONDITION_ON_IMAGE,
            "channels": tuple(c.CHANNELS),
            "lr": c.LR,
            "betas": tuple(c.BETAS),
            "gp_weight": c.GP_WEIGHT,
            "critic_steps": c.CRITIC_STEPS,
        }

    def _critic_input(self, scores, inputs):
        probs = F.softmax(scores, dim=1)
        if self.condition_on_image:
            probs = torch.cat([probs, inputs.images_at(scores.shape[-2:]).to(probs.dtype)], dim=1)
        return probs

    def critic_step(self, real, fake):
        """One Adam step of the critic on detached ``real`` / ``fake`` inputs; returns its loss."""
        params = {n: p.detach().requires_grad_(True) for n, p in self.discriminator.named_parameters()}

        def critic(x):
            return functional_call(self.discriminator, params, (x,))

        with torch.enable_grad():
            loss = wasserstein_critic_loss(critic(real), critic(fake))
            if self.gp_weight > 0:
                loss = loss + self.gp_weight * gradient_penalty(critic, real, fake)
            grads = torch.autograd.grad(loss, list(params.values()))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for g in grads:
                dist.all_reduce(g)
                g.div_(dist.get_world_size())
        self.adam_step += 1
        step = int(self.adam_step.item())
        for i, p in enumerate(self.discriminator.parameters()):
            adam_update_(p, grads[i], getattr(self, f"adam_exp_avg_{i}"), getattr(self, f"adam_exp_avg_sq_{i}"),
                         step, self.lr, self.betas)
        return loss.detach()

    def forward(self, student, teacher, inputs):
        fake = self._critic_input(student[self.tap], inputs)
        if self.training and torch.is_grad_enabled():
            real = self._critic_input(teacher[self.tap], inputs).detach()
            for _ in range(self.critic_steps):
                critic_loss = self.critic_step(real, fake.detach())
            _put_scalar("kd_holistic_critic", critic_loss)
        # The critic's parameters do not require grad: this term's gradient reaches the student only.
        return {self.output_name(): self.weight * wasserstein_generator_loss(self.discriminator(fake))}


def _put_scalar(name, value):
    try:
        storage = get_event_storage()
    except AssertionError:  # no EventStorage outside the trainer
        return
    storage.put_scalar(name, float(value))


def build_kd_losses(cfg):
    """``nn.ModuleDict`` of the losses named in ``cfg.DISTILL.LOSSES``, built from their config nodes."""
    losses = nn.ModuleDict()
    for name in cfg.DISTILL.LOSSES:
        if name in losses:
            raise ValueError(f"DISTILL.LOSSES names {name!r} twice")
        try:
            cls = KD_LOSS_REGISTRY.get(name)
        except KeyError:
            raise KeyError(
                f"DISTILL.LOSSES: unknown KD loss {name!r}; registered: {sorted(n for n, _ in KD_LOSS_REGISTRY)}"
            ) from None
        losses[name] = cls(cfg)
    return losses

"""Knowledge distillation from a frozen teacher into a student: KD losses (a registry), feature taps with
adapters, and the "Distiller" meta-architecture. Importing registers them."""
from . import config as _config  # noqa: F401  (registers this subsystem's config keys)
from .distiller import Distiller, build_teacher, parse_taps, probe_size
from .losses import (
    KD_LOSS_REGISTRY,
    ChannelWiseKD,
    HolisticKD,
    IntraClassVariationKD,
    KDInputs,
    KDLoss,
    PairwiseSimilarityKD,
    PixelKD,
    build_kd_losses,
    register_kd_loss,
    channel_wise_kd_loss,
    intra_class_variation_loss,
    pairwise_similarity_loss,
    pixel_kd_loss,
)
from .taps import FeatureTaps, find_module, make_adapters, probe_channels

__all__ = [
    "Distiller",
    "build_teacher",
    "parse_taps",
    "probe_size",
    "KD_LOSS_REGISTRY",
    "register_kd_loss",
    "KDLoss",
    "KDInputs",
    "PixelKD",
    "ChannelWiseKD",
    "PairwiseSimilarityKD",
    "IntraClassVariationKD",
    "HolisticKD",
    "build_kd_losses",
    "pixel_kd_loss",
    "channel_wise_kd_loss",
    "pairwise_similarity_loss",
    "intra_class_variation_loss",
    "FeatureTaps",
    "find_module",
    "make_adapters",
    "probe_channels",
]

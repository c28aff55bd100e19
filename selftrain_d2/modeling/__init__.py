"""Models: backbones, Mask2Former-style pixel decoder / transformer decoder / head, matcher and
criterion, meta-architectures. Importing registers them with Detectron2's registries."""
from . import config as _config  # noqa: F401  (registers this subsystem's config keys)
from . import backbone, heads, meta_arch, pixel_decoder, transformer_decoder  # noqa: F401
from .build import apply_memory_format, build_model  # noqa: F401

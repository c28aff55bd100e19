"""DistributedDataParallel wrapping that works for CPU (gloo) as well as GPU processes."""
from detectron2.engine.defaults import create_ddp_model
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

__all__ = ["wrap_ddp", "unwrap_ddp"]


def wrap_ddp(model, **kwargs):
    """Detectron2's ``create_ddp_model``, without the ``device_ids`` that CPU modules reject."""
    if comm.get_world_size() > 1 and "device_ids" not in kwargs:
        on_gpu = next(model.parameters()).device.type == "cuda"
        kwargs["device_ids"] = [comm.get_local_rank()] if on_gpu else None
    return create_ddp_model(model, **kwargs)


def unwrap_ddp(model):
    return model.module if isinstance(model, DistributedDataParallel) else model

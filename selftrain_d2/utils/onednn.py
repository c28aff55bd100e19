"""oneDNN (the CPU convolution library inside PyTorch) settings that must be made before its first use.

oneDNN compiles a kernel ("primitive") per convolution, input shape and pass (forward, backward-data,
backward-weights) and keeps them in an LRU cache of ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` entries, 1024 by
default. A crop-size schedule trains on several crop x batch shapes, each with its own set of primitives
(about 140 for the demo DeepLabV3+: 1090 counted with ONEDNN_VERBOSE=2 over its schedule's 8 crop x batch
shapes). Once they outnumber the cache, LRU order evicts every kernel before it is used again and each shape
change recompiles the whole network; on the demo coarse2fine+ schedule that was 26 s of a 233 s run. The
capacity is read once, at oneDNN's first primitive, from the environment.
"""
import logging
import os

__all__ = ["CACHE_CAPACITY_ENV", "set_primitive_cache_capacity"]

CACHE_CAPACITY_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def set_primitive_cache_capacity(capacity, environ=None):
    """Ask oneDNN for a primitive cache of ``capacity`` entries; return the capacity now in force.

    ``capacity`` <= 0 leaves oneDNN's default. A value the user already set in the environment wins. Only
    takes effect if no oneDNN primitive has been created yet in this process (call it before the first
    convolution); child processes (DDP workers, recipe stages) inherit it.
    """
    environ = os.environ if environ is None else environ
    capacity = int(capacity)
    if CACHE_CAPACITY_ENV in environ:
        value = environ[CACHE_CAPACITY_ENV]
        if capacity > 0 and value != str(capacity):
            logging.getLogger(__name__).info(
                "%s=%s from the environment is kept (config asks for %d)", CACHE_CAPACITY_ENV, value, capacity
            )
        return int(value) if value.strip().lstrip("-").isdigit() else None
    if capacity <= 0:
        return None
    environ[CACHE_CAPACITY_ENV] = str(capacity)
    return capacity

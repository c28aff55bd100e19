"""Loading model weights a user may have downloaded, without running code from them.

- ``.pth`` (and pycls ``.pyth``) files: ``torch.load(weights_only=True)``, asked for explicitly, so neither an
  older torch nor ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` turns it off.
- Detectron2 / Mask2Former model-zoo ``.pkl`` files (pickled dicts of numpy arrays; Detectron2 itself reads
  them with a plain ``pickle.load``): :class:`WeightsUnpickler` admits only the globals those files need to
  rebuild numpy arrays and dtypes; anything else is refused with the file and the global named.
- :class:`SafeCheckpointer`: Detectron2's ``DetectionCheckpointer`` with both, for every place that loads
  weights into a model (the trainer's checkpointer builds on it).
"""
import codecs
import os
import pickle
import zipfile

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = [
    "SafeCheckpointer",
    "UnsafeWeightsError",
    "WeightsFileError",
    "WeightsUnpickler",
    "load_pickle_weights",
    "load_torch_weights",
    "weights_file_problem",
]


class WeightsFileError(RuntimeError):
    """A weights file that cannot be read (missing, truncated, not a checkpoint); the message names it."""


class UnsafeWeightsError(WeightsFileError):
    """A weights file whose loading would create objects other than weights (and could run code)."""


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles written by Python 3 store bytes (a numpy array's data) as
    # _codecs.encode(str, "latin1"); no other codec is needed, so no other is looked up.
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591", "l1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} (only latin1 is admitted)")
    return codecs.encode(text, "latin1", errors)


# (module, name) -> the object to use; None: the global itself, imported when a file asks for it. Protocols
# 0-2 name the builtins module "__builtin__" (empty bytes are bytes()); numpy 2 writes "numpy._core", numpy 1
# "numpy.core", and numpy 1.26 reads both.
_ADMITTED = {
    ("collections", "OrderedDict"): None,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): bytes,
    ("builtins", "bytes"): bytes,
    **{(module, name): None
       for core in ("numpy.core", "numpy._core")
       for module, name in ((f"{core}.multiarray", "_reconstruct"), (f"{core}.multiarray", "scalar"),
                            (f"{core}.numeric", "_frombuffer"))},
    ("numpy", "ndarray"): None,
    ("numpy", "dtype"): None,
}


class WeightsUnpickler(pickle.Unpickler):
    """An unpickler for model-zoo weights: dicts, lists, tuples, numbers, strings, numpy arrays and dtypes.

    Any other global (a class or function the pickle would call) raises :class:`UnsafeWeightsError`
    naming ``path`` and the global, before anything is called."""

    def __init__(self, file, path, **kwargs):
        super().__init__(file, **kwargs)
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in _ADMITTED:
            raise UnsafeWeightsError(
                f"{self.path}: refused to load global {module}.{name}: a model-zoo .pkl holds only dicts, lists, "
                "numbers, strings and numpy arrays, and loading this one would call other code. Use weights "
                "from a source you trust, saved as a state dict (.pth)")
        admitted = _ADMITTED[(module, name)]
        return admitted if admitted is not None else super().find_class(module, name)


def load_pickle_weights(path):
    """The object pickled in ``path`` (a model-zoo ``.pkl``), through :class:`WeightsUnpickler`. Python 2
    pickles (Detectron1 / Caffe2 zoo) are read with latin1 strings, as Detectron2 does."""
    try:
        with open(path, "rb") as f:
            return WeightsUnpickler(f, path, encoding="latin1").load()
    except WeightsFileError:
        raise
    except FileNotFoundError:
        raise WeightsFileError(f"{path}: no such weights file") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise WeightsFileError(f"{path}: not a readable model-zoo .pkl ({_first_sentence(e)})") from e


def load_torch_weights(path, mmap=False):
    """``torch.load(path, weights_only=True)`` on the CPU; errors name the file. ``mmap``: map the tensors
    instead of reading them (zip checkpoints only), which checks the file's structure cheaply."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" in text:
            reason = next((line.strip() for line in text.splitlines() if "WeightsUnpickler error" in line), text)
            raise UnsafeWeightsError(
                f"{path}: refused to load: it holds more than weights ({reason}). Use weights from a source you "
                "trust, saved as a state dict") from None
        raise WeightsFileError(f"{path}: not a readable checkpoint ({text})") from e
    except FileNotFoundError:
        raise WeightsFileError(f"{path}: no such weights file") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise WeightsFileError(f"{path}: not a readable checkpoint ({_first_sentence(e)})") from e


def _first_sentence(error):
    # torch's messages for a corrupt zip go on for several sentences of advice.
    text = str(error).strip().split(". ")[0]
    return f"{type(error).__name__}: {text}" if text else f"{type(error).__name__}: empty or truncated"


def weights_file_problem(path):
    """``None`` when ``path`` loads as weights (safely), else what is wrong with it, the path included. Zip
    checkpoints (every ``torch.save`` since torch 1.6) are checked without reading their tensors."""
    if not os.path.isfile(path):
        return f"{path} is missing"
    try:
        if path.endswith(".pkl"):
            load_pickle_weights(path)
        else:
            load_torch_weights(path, mmap=zipfile.is_zipfile(path))
    except WeightsFileError as e:
        return str(e)
    return None


class SafeCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose loading runs no code from the file: ``.pth`` / ``.pyth`` through
    ``weights_only=True``, model-zoo ``.pkl`` through :class:`WeightsUnpickler`, read into the same
    formats Detectron2 reads them into (Detectron2 zoo, Caffe2 / Detectron1 zoo, pycls)."""

    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            return _model_zoo_checkpoint(load_pickle_weights(filename), filename)
        if filename.endswith(".pyth"):
            data = load_torch_weights(filename)
            if not isinstance(data, dict) or "model_state" not in data:
                raise WeightsFileError(f"{filename}: a pycls .pyth checkpoint must hold 'model_state'")
            state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        return super()._load_file(filename)

    def _torch_load(self, f):
        return load_torch_weights(f)


def _model_zoo_checkpoint(data, filename):
    """A loaded ``.pkl`` in Detectron2's checkpoint format: a Detectron2 zoo file as it is, a Caffe2 /
    Detectron1 one (its ``blobs``, without the ``_momentum`` entries) marked for Caffe2 name conversion."""
    if not isinstance(data, dict):
        raise WeightsFileError(f"{filename}: a model-zoo .pkl holds a dict, this one a {type(data).__name__}")
    if "model" in data and "__author__" in data:
        return data
    blobs = data.get("blobs", data)
    return {"model": {k: v for k, v in blobs.items() if not k.endswith("_momentum")}, "__author__": "Caffe2",
            "matching_heuristics": True}

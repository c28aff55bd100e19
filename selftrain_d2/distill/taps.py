"""Named feature taps: forward hooks on configured submodules of a model (``"backbone.res5"``,
``"classifier"``, ``"sem_seg_head.predictor"`` ...) that keep their outputs while a capture is open, and
learned 1x1 adapters from the student's channel count to the teacher's."""
import contextlib
import difflib
import sys

import torch
from torch import nn

__all__ = ["FeatureTaps", "find_module", "make_adapters", "probe_channels"]


def find_module(model, name, what="model"):
    """``model``'s submodule called ``name`` (as in ``named_modules``); a KeyError suggests close names."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    hint = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.5)
    suggestion = f"; did you mean {' or '.join(hint)}?" if hint else ""
    raise KeyError(f"{what} has no submodule {name!r} to tap{suggestion}")


class FeatureTaps:
    """Forward hooks on ``model``'s submodules, ``{tap name: module name}``. Outputs are recorded only
    inside ``with taps.capture() as maps:``, where ``maps[tap name]`` is the tensor that module returned
    last (a module that returns a tuple or list gives its first element)."""

    def __init__(self, model, module_names, what="model"):
        self.module_names = dict(module_names)
        self._maps = None
        self._handles = [
            find_module(model, module, what).register_forward_hook(self._hook(tap))
            for tap, module in self.module_names.items()
        ]

    def _hook(self, tap):
        def record(module, args, output):
            if self._maps is None:
                return
            if isinstance(output, (tuple, list)):
                output = output[0]
            if not torch.is_tensor(output):
                raise TypeError(
                    f"tap {tap!r} on {self.module_names[tap]!r}: the module returns {type(output).__name__}, "
                    "not a tensor; tap a submodule that returns a feature map"
                )
            self._maps[tap] = output

        return record

    @contextlib.contextmanager
    def capture(self):
        self._maps = {}
        try:
            yield self._maps
        finally:
            maps, self._maps = self._maps, None
            missing = set(self.module_names) - set(maps)
            if missing and sys.exc_info()[0] is None:
                raise RuntimeError(
                    f"taps {sorted(missing)} ({[self.module_names[t] for t in sorted(missing)]}) recorded nothing: "
                    "the forward pass did not run those modules"
                )

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


@torch.no_grad()
def probe_channels(model, taps, image_size):
    """``{tap name: channels}`` of ``taps`` (a :class:`FeatureTaps` on ``model``), from one inference
    forward of a zero image of ``image_size`` (H, W); ``model``'s train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with taps.capture() as maps:
            model([{"image": torch.zeros(3, *image_size), "height": image_size[0], "width": image_size[1]}])
    finally:
        model.train(was_training)
    return {name: int(t.shape[1]) for name, t in maps.items()}


def make_adapters(student_channels, teacher_channels, names):
    """``nn.ModuleDict`` of 1x1 convs (student channels -> teacher channels) for the taps in ``names`` whose
    channel counts differ."""
    adapters = nn.ModuleDict()
    for name in names:
        s, t = student_channels[name], teacher_channels[name]
        if s != t:
            adapters[name] = nn.Conv2d(s, t, kernel_size=1)
    return adapters

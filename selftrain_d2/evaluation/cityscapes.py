"""Detectron2's Cityscapes evaluators, made to work across machines.

Detectron2's share one temporary folder between the processes of a machine (the prediction files each
process writes are read by rank 0's cityscapesscripts run) and assert that all processes are on one machine.
Across machines, each process here writes to a folder of its own, and ``evaluate`` gathers the files' bytes
to rank 0, which evaluates the same set of files as a single-machine run would. On one machine nothing
changes.

cityscapesscripts' instance evaluation also writes every match to ``matches.json`` in the working directory
(tens of MB on Cityscapes val, clobbered by two runs in one folder); here it goes to the evaluator's
temporary folder instead.
"""
import os
import tempfile
from unittest import mock

from detectron2.evaluation import CityscapesInstanceEvaluator, CityscapesSemSegEvaluator
from detectron2.utils import comm

__all__ = ["MultiMachineCityscapesInstanceEvaluator", "MultiMachineCityscapesSemSegEvaluator"]


class _GatherPredictionFiles:
    """Mixin over a Detectron2 ``CityscapesEvaluator`` subclass (it must come first in the bases)."""

    def reset(self):
        self._gather_files = comm.get_local_size() != comm.get_world_size()
        if not self._gather_files:
            return super().reset()
        self._working_dir = tempfile.TemporaryDirectory(prefix="cityscapes_eval_")
        self._temp_dir = self._working_dir.name
        self._logger.info("Writing cityscapes results to %s, gathered to rank 0 before evaluation", self._temp_dir)

    def evaluate(self):
        if self._gather_files:
            gathered = comm.gather(self._read_files(), dst=0)  # rank 0: one {name: bytes} per rank
            if comm.is_main_process():
                for files in gathered[1:]:
                    for name, data in files.items():
                        with open(os.path.join(self._temp_dir, name), "wb") as f:
                            f.write(data)
            else:
                self._working_dir.cleanup()
        return super().evaluate()  # rank 0 evaluates its folder (now every rank's files); the others return None

    def _read_files(self):
        if comm.is_main_process():
            return {}
        files = {}
        for name in os.listdir(self._temp_dir):
            with open(os.path.join(self._temp_dir, name), "rb") as f:
                files[name] = f.read()
        return files


class MultiMachineCityscapesSemSegEvaluator(_GatherPredictionFiles, CityscapesSemSegEvaluator):
    """``CityscapesSemSegEvaluator`` that also works when the processes are on several machines."""


class MultiMachineCityscapesInstanceEvaluator(_GatherPredictionFiles, CityscapesInstanceEvaluator):
    """``CityscapesInstanceEvaluator`` that also works when the processes are on several machines, and leaves
    nothing in the working directory."""

    def evaluate(self):
        import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cityscapes_eval

        write = cityscapes_eval.writeDict2JSON

        def write_beside_predictions(data, path):
            if not os.path.isabs(path):
                path = os.path.join(self._temp_dir, path)
            return write(data, path)

        with mock.patch.object(cityscapes_eval, "writeDict2JSON", write_beside_predictions):
            return super().evaluate()

"""The folder :func:`~selftrain_d2.pseudo_labels.generate_pseudo_labels` writes, as one class that knows its
files and reads them: for the writer, the recipe's stages and report, the benchmarks, and the registration of
``DATASETS.PSEUDO_LABEL_FOLDERS`` entries as training datasets.

Layout (the generator's module docstring says what each holds)::

    meta.json, dataset.json, report.json, instances.json (instance task)
    labels/KEY.png, confidence/KEY.png, soft/KEY.npz   (semantic)
    instances/KEY.json                                 (instance)
    progress/rankR.jsonl
"""
import json
import os

from detectron2.structures import BoxMode

from ..data.datasets.register import expand_path, register_dataset_kind, register_once

__all__ = ["PseudoLabelFolder", "register_pseudo_label_dataset", "load_pseudo_label_dataset"]


class PseudoLabelFolder:
    """A pseudo-label folder at ``root`` (``~`` and ``$VARS`` expanded, made absolute). ``settings``: the
    generator's settings (meta.json's ``settings``), which decide the files of an image; read from meta.json
    when not given."""

    META, DATASET, REPORT, INSTANCES = "meta.json", "dataset.json", "report.json", "instances.json"

    def __init__(self, root, settings=None):
        self.root = expand_path(root)
        self._settings = settings

    def path(self, name):
        return os.path.join(self.root, name)

    def exists(self):
        """True once the generator has finished: meta.json and dataset.json are both there."""
        return os.path.isfile(self.path(self.META)) and os.path.isfile(self.path(self.DATASET))

    def _read(self, name):
        path = self.path(name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pseudo-label folder {self.root} has no {name}; run "
                                    f"tools/generate_pseudo_labels.py --output {self.root} first")
        with open(path) as f:
            return json.load(f)

    def meta(self):
        """meta.json: task, classes, ignore label, the settings and the teacher."""
        return self._read(self.META)

    def records(self):
        """Detectron2 dataset dicts of the labelled images (dataset.json; instance boxes get their BoxMode)."""
        records = self._read(self.DATASET)
        for record in records:
            for ann in record.get("annotations", ()):
                ann["bbox_mode"] = BoxMode(ann["bbox_mode"])
        return records

    def report(self):
        """report.json (images, written, skipped, speed), or None before the generator has finished."""
        return self._read(self.REPORT) if os.path.isfile(self.path(self.REPORT)) else None

    @property
    def settings(self):
        if self._settings is None:
            self._settings = self.meta()["settings"]
        return self._settings

    def files(self, key):
        """The files image ``key``'s labels consist of (all must exist for it to count as finished)."""
        s = self.settings
        if s["task"] == "instance":
            return {"instances": os.path.join(self.root, "instances", key + ".json")}
        files = {"label": os.path.join(self.root, "labels", key + ".png")}
        if s["save_confidence"]:
            files["confidence"] = os.path.join(self.root, "confidence", key + ".png")
        if s["format"] == "soft":
            files["soft"] = os.path.join(self.root, "soft", key + ".npz")
        return files

    def progress_file(self, rank):
        return os.path.join(self.root, "progress", f"rank{rank}.jsonl")

    def metadata(self):
        """Detectron2 metadata of the folder as a dataset: semantic labels get ``stuff_classes``,
        ``ignore_label`` and ``evaluator_type`` "sem_seg"; instance labels ``thing_classes``, the dataset-id
        mapping and "coco"."""
        meta = self.meta()
        metadata = {"pseudo_label_dir": self.root, "pseudo_label_source": meta.get("source")}
        if meta.get("task") == "instance":
            metadata.update(thing_classes=meta["thing_classes"], evaluator_type="coco",
                            json_file=self.path(self.INSTANCES))
            if meta.get("thing_dataset_id_to_contiguous_id"):
                metadata["thing_dataset_id_to_contiguous_id"] = {
                    int(k): int(v) for k, v in meta["thing_dataset_id_to_contiguous_id"].items()
                }
            if meta.get("thing_colors"):
                metadata["thing_colors"] = meta["thing_colors"]
        else:
            metadata.update(stuff_classes=meta["stuff_classes"], ignore_label=meta.get("ignore_label", 255),
                            evaluator_type="sem_seg")
            if meta.get("stuff_colors"):
                metadata["stuff_colors"] = meta["stuff_colors"]
        return metadata

    def register(self, name):
        """Register the folder as the training dataset ``name``; the same name and folder again does nothing."""
        self._read(self.DATASET)  # a folder the generator has not finished is an error now, not at training
        register_once([(name, ("pseudo_labels", self.root), self.records, self.metadata())])
        return name


def load_pseudo_label_dataset(folder):
    """The dataset dicts of a pseudo-label folder (:meth:`PseudoLabelFolder.records`)."""
    return PseudoLabelFolder(folder).records()


def register_pseudo_label_dataset(name, folder):
    """Register the pseudo-label folder ``folder`` as the training dataset ``name`` (:meth:`PseudoLabelFolder.register`)."""
    return PseudoLabelFolder(folder).register(name)


register_dataset_kind("PSEUDO_LABEL_FOLDERS", register_pseudo_label_dataset)

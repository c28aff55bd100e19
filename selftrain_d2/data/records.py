"""Facts about Detectron2 dataset dicts that several modules need, decided in one place."""
import os

__all__ = ["image_key"]


def image_key(record):
    """The id that split files list for a dataset dict.

    COCO-style records carry ``image_id``; Cityscapes and folder records do not, so the file name
    without its directory, extension and Cityscapes' ``_leftImg8bit`` suffix stands in.
    """
    if "image_id" in record:
        return str(record["image_id"])
    stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
    return stem[: -len("_leftImg8bit")] if stem.endswith("_leftImg8bit") else stem

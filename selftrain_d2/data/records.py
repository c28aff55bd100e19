"""Facts about Detectron2 dataset dicts that several modules need, decided in one place."""
import os
import re

__all__ = ["image_key"]

# Cityscapes frames are named <city>_<seq>_<frame>_leftImg8bit.png; the semantic loader gives no
# image_id and the instance loader gives the whole file name, so both reduce to <city>_<seq>_<frame>.
_CITYSCAPES_SUFFIX = re.compile(r"_leftImg8bit(\.png)?$")


def image_key(record):
    """The id that split files list for a dataset dict.

    COCO-style records carry ``image_id``; Cityscapes and folder records may not, so the file name
    without its directory and extension stands in. Cityscapes' ``_leftImg8bit`` suffix is dropped,
    so one split file serves its semantic, instance and panoptic datasets alike.
    """
    if "image_id" in record:
        return _CITYSCAPES_SUFFIX.sub("", str(record["image_id"]))
    stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
    return _CITYSCAPES_SUFFIX.sub("", stem)

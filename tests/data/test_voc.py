"""Pascal VOC 2012 semantic segmentation (and the SBD-augmented set) on a tiny fake folder in the public layout."""
import os
import uuid

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from selftrain_d2.data.datasets.voc import CLASSES, register_voc_sem_seg, voc_palette
from selftrain_d2.data.image_io import read_sem_seg


def _palette_png(path, ids):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(np.asarray(ids, np.uint8), mode="P")
    im.putpalette([c for rgb in voc_palette() for c in rgb])
    im.save(path)


@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    labels = {"a": [[0, 15, 255, 20]], "b": [[1, 1, 0, 0]], "c": [[7, 255, 7, 0]]}
    for stem in labels:
        os.makedirs(root / "JPEGImages", exist_ok=True)
        Image.fromarray(np.full((1, 4, 3), 100, np.uint8)).save(root / "JPEGImages" / f"{stem}.jpg")
        _palette_png(root / "SegmentationClassAug" / f"{stem}.png", labels[stem])
    for stem in ("a", "b"):
        _palette_png(root / "SegmentationClass" / f"{stem}.png", labels[stem])
    sets = root / "ImageSets" / "Segmentation"
    os.makedirs(sets)
    (sets / "train.txt").write_text("a\n")
    (sets / "val.txt").write_text("b\n\n")
    (sets / "train_aug.txt").write_text("/JPEGImages/a.jpg /SegmentationClassAug/a.png\n/JPEGImages/c.jpg /SegmentationClassAug/c.png\n")
    prefix = f"test_voc_{uuid.uuid4().hex[:8]}"
    yield tmp_path, root, labels, prefix
    for name in DatasetCatalog.list():
        if name.startswith(prefix):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_splits_records_metadata_and_palette_labels(voc):
    tmp_path, root, labels, prefix = voc
    names = register_voc_sem_seg(root=tmp_path, prefix=prefix)
    assert names == [f"{prefix}_train", f"{prefix}_val", f"{prefix}_train_aug"]
    train, val, aug = (DatasetCatalog.get(n) for n in names)
    assert [r["image_id"] for r in train] == ["a"] and [r["image_id"] for r in val] == ["b"]
    assert [r["image_id"] for r in aug] == ["a", "c"]
    assert aug[1]["sem_seg_file_name"] == str(root / "SegmentationClassAug" / "c.png")
    assert train[0]["file_name"] == str(root / "JPEGImages" / "a.jpg")
    # Palette indices are the class ids; 255 stays the ignore label.
    assert read_sem_seg(train[0]["sem_seg_file_name"], 21).tolist() == labels["a"]
    meta = MetadataCatalog.get(names[0])
    assert meta.stuff_classes == list(CLASSES) and len(CLASSES) == 21
    assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    assert meta.stuff_colors[15] == [192, 128, 128]  # person, as in the devkit palette


def test_missing_label_and_folder_fail_with_the_path(voc):
    tmp_path, root, _, prefix = voc
    os.remove(root / "SegmentationClass" / "b.png")
    names = register_voc_sem_seg(root=tmp_path, prefix=prefix)
    with pytest.raises(FileNotFoundError, match=r"b\.png"):
        DatasetCatalog.get(names[1])
    names = register_voc_sem_seg(root=tmp_path / "elsewhere", prefix=prefix + "x")
    with pytest.raises(FileNotFoundError, match="image folder .*JPEGImages does not exist"):
        DatasetCatalog.get(names[0])


def test_builtin_names_registered():
    assert {"voc_2012_sem_seg_train", "voc_2012_sem_seg_val", "voc_2012_sem_seg_train_aug"} <= set(DatasetCatalog.list())

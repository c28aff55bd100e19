"""Any folder of unlabeled images as a Detectron2 dataset.

Records have ``file_name`` (absolute path) and ``image_id`` (the path relative to the folder, without its
extension, with '/' separators: ``city/aachen_000001``), and no labels. ``height`` / ``width`` are left out on
purpose: reading every header would cost each process seconds to minutes on a large folder at load time,
and nothing downstream needs them before the image is decoded (Detectron2's mappers and models take the
size from the decoded image).
"""
import os

from .register import expand_path, register_once

__all__ = ["IMAGE_EXTENSIONS", "find_images", "load_image_folder", "register_image_folder"]

# Compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def find_images(folder, extensions=IMAGE_EXTENSIONS):
    """Relative paths ('/'-separated) of the images under ``folder``, searched recursively, sorted.

    Hidden files and folders (names starting with '.') are skipped; symlinked folders are followed once.
    Raises FileNotFoundError for a missing folder, NotADirectoryError for a file.
    """
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        raise FileNotFoundError(f"Image folder {folder} does not exist (absolute: {os.path.abspath(folder)}).")
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"Image folder {folder} is not a directory.")
    extensions = tuple(e.lower() for e in extensions)
    found = []
    seen_dirs = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen_dirs:  # a symlink loop, or the same folder linked twice
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_root = os.path.relpath(root, folder)
        for f in files:
            if f.startswith(".") or not f.lower().endswith(extensions):
                continue
            rel = f if rel_root == "." else os.path.join(rel_root, f)
            found.append(rel.replace(os.sep, "/"))
    found.sort()
    return found


def load_image_folder(folder, extensions=IMAGE_EXTENSIONS):
    """Dataset dicts for the images under ``folder`` (see the module docstring)."""
    folder = os.fspath(folder)
    relpaths = find_images(folder, extensions)
    if not relpaths:
        raise FileNotFoundError(
            f"Image folder {folder} holds no images: searched it recursively for files ending in "
            f"{', '.join(extensions)} (any letter case; names starting with '.' skipped)."
        )
    records = []
    by_id = {}
    for rel in relpaths:
        image_id = os.path.splitext(rel)[0]
        if image_id in by_id:
            raise ValueError(
                f"Image folder {folder}: {by_id[image_id]} and {rel} would share the image id {image_id!r} "
                "(the path without its extension); rename or remove one of them."
            )
        by_id[image_id] = rel
        records.append({"file_name": os.path.join(folder, *rel.split("/")), "image_id": image_id})
    return records


def register_image_folder(name, folder):
    """Register dataset ``name`` with the images under ``folder``; the folder is read when it is loaded.

    Registering the same name with the same folder again does nothing; with another folder it is an error.
    Metadata: ``image_root`` = the folder (absolute). Returns ``name``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Image folder dataset name must be a non-empty string, got {name!r}.")
    folder = expand_path(folder)
    register_once([(name, ("image_folder", folder), lambda: load_image_folder(folder), {"image_root": folder})])
    return name

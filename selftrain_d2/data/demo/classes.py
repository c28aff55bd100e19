"""Class lists, label colours and default split sizes of the two demo domains.

Both domains share one id space: the rural domain keeps the city's ten classes with the same train
ids and appends the two classes the city lacks (``terrain``, ``truck``). A model trained on city
labels therefore predicts valid rural ids, and the extra rural ids measure how a method copes with
classes never seen in the source domain.
"""

__all__ = [
    "GENERATOR_VERSION",
    "DEFAULT_SEED",
    "IGNORE_LABEL",
    "IMAGE_HEIGHT",
    "IMAGE_WIDTH",
    "DOMAINS",
    "SPLITS",
    "DEFAULT_COUNTS",
    "CITY_CLASSES",
    "RURAL_CLASSES",
    "CITY_THING_CLASSES",
    "RURAL_THING_CLASSES",
    "DOMAIN_CLASSES",
    "DOMAIN_THING_CLASSES",
    "THING_CLASS_NAMES",
    "CLASS_COLORS",
    "class_colors",
    "thing_train_ids",
]

# Bump whenever the drawing code changes what is generated: the cache folder is named after it,
# so stale data on disk is never mixed with data from new code.
GENERATOR_VERSION = 1
DEFAULT_SEED = 2024
IGNORE_LABEL = 255
IMAGE_HEIGHT = 128
IMAGE_WIDTH = 256

# Order matters: the index of a domain / split is part of every image's random seed.
DOMAINS = ("city", "rural")
SPLITS = ("labeled", "unlabeled", "val")
DEFAULT_COUNTS = {
    "city": {"labeled": 20, "unlabeled": 400, "val": 100},
    "rural": {"labeled": 20, "unlabeled": 300, "val": 100},
}

CITY_CLASSES = (
    "road",  # 0
    "sidewalk",  # 1
    "building",  # 2
    "vegetation",  # 3
    "sky",  # 4
    "pole",  # 5
    "traffic sign",  # 6
    "car",  # 7
    "person",  # 8
    "bicycle",  # 9
)
RURAL_CLASSES = CITY_CLASSES + (
    "terrain",  # 10
    "truck",  # 11
)
THING_CLASS_NAMES = frozenset({"car", "person", "bicycle", "truck"})

CITY_THING_CLASSES = tuple(c for c in CITY_CLASSES if c in THING_CLASS_NAMES)
RURAL_THING_CLASSES = tuple(c for c in RURAL_CLASSES if c in THING_CLASS_NAMES)

DOMAIN_CLASSES = {"city": CITY_CLASSES, "rural": RURAL_CLASSES}
DOMAIN_THING_CLASSES = {"city": CITY_THING_CLASSES, "rural": RURAL_THING_CLASSES}

# Colours for visualising labels (the usual street-scene palette), not the colours the scenes are
# painted with: those live in scenes.py and differ between domains.
CLASS_COLORS = {
    "road": (128, 64, 128),
    "sidewalk": (244, 35, 232),
    "building": (70, 70, 70),
    "vegetation": (107, 142, 35),
    "sky": (70, 130, 180),
    "pole": (153, 153, 153),
    "traffic sign": (220, 220, 0),
    "car": (0, 0, 142),
    "person": (220, 20, 60),
    "bicycle": (119, 11, 32),
    "terrain": (152, 251, 152),
    "truck": (0, 0, 70),
}


def class_colors(classes):
    """RGB label colours for ``classes``, as lists (the form Detectron2's metadata uses)."""
    return [list(CLASS_COLORS[c]) for c in classes]


def thing_train_ids(domain):
    """Train ids (indices into the domain's class list) of the domain's thing classes, in order."""
    classes = DOMAIN_CLASSES[domain]
    return [classes.index(c) for c in DOMAIN_THING_CLASSES[domain]]

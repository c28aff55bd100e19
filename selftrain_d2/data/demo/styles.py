"""Per-domain appearance and layout statistics of the demo scenes.

The two domains share the drawing code (scenes.py) and differ only through a ``DomainStyle``: the
rural domain has a lower horizon, a narrower road with few sidewalks, fields (terrain) and tree lines
instead of building rows, trucks, fewer people, and a dusk palette (warm tint, low contrast, darker).
"""
from dataclasses import dataclass
from typing import Tuple

__all__ = ["DomainStyle", "CITY_STYLE", "RURAL_STYLE", "STYLES", "SKIN", "PANTS", "HAIR", "TYRE", "GLASS"]


@dataclass(frozen=True)
class DomainStyle:
    """Everything that differs between domains: layout statistics, palette, object counts, lighting."""

    name: str
    horizon: Tuple[float, float]  # horizon row as a fraction of the height
    road_half_width: Tuple[float, float]  # world units
    sidewalk_prob: float  # per side
    sidewalk_width: Tuple[float, float]
    wall_setback: Tuple[float, float]  # world units of terrain between sidewalk and side walls
    wall_kinds: Tuple[float, float, float]  # probabilities of building / vegetation / gap segments
    building_height: Tuple[float, float]
    hedge_height: Tuple[float, float]
    ground_fill: str  # class under everything that is neither road nor sidewalk
    # mean object counts per image (Poisson)
    n_cars: float
    n_trucks: float
    n_persons: float
    n_bicycles: float
    n_poles: float
    n_trees: float
    n_clutter: float
    sign_prob: float
    # palette (RGB, 0..255)
    sky_top: Tuple[int, int, int]
    sky_horizon: Tuple[int, int, int]
    cloud: Tuple[int, int, int]
    road: Tuple[int, int, int]
    lane_mark: Tuple[int, int, int]
    sidewalk: Tuple[int, int, int]
    building_colors: Tuple[Tuple[int, int, int], ...]
    window_colors: Tuple[Tuple[int, int, int], ...]
    roof: Tuple[int, int, int]
    vegetation: Tuple[int, int, int]
    terrain: Tuple[Tuple[int, int, int], ...]
    pole: Tuple[int, int, int]
    car_colors: Tuple[Tuple[int, int, int], ...]
    clutter_colors: Tuple[Tuple[int, int, int], ...]
    # photometric
    brightness: Tuple[float, float]
    contrast: Tuple[float, float]
    tint: Tuple[float, float, float]
    gradient: Tuple[float, float]
    blur_sigma: Tuple[float, float]
    noise_sigma: Tuple[float, float]


CITY_STYLE = DomainStyle(
    name="city",
    horizon=(0.36, 0.46),
    road_half_width=(1.3, 1.9),
    sidewalk_prob=1.0,
    sidewalk_width=(0.6, 1.1),
    wall_setback=(0.0, 0.0),
    wall_kinds=(0.75, 0.15, 0.10),
    building_height=(2.5, 8.0),
    hedge_height=(0.8, 2.5),
    ground_fill="sidewalk",
    n_cars=2.6,
    n_trucks=0.0,
    n_persons=1.3,
    n_bicycles=0.6,
    n_poles=1.6,
    n_trees=1.2,
    n_clutter=0.7,
    sign_prob=0.6,
    sky_top=(95, 145, 215),
    sky_horizon=(185, 208, 235),
    cloud=(235, 238, 242),
    road=(98, 98, 104),
    lane_mark=(225, 225, 220),
    sidewalk=(172, 164, 155),
    building_colors=((150, 150, 156), (185, 170, 145), (150, 95, 78), (205, 200, 188), (112, 118, 128),
                     (170, 140, 120)),
    window_colors=((45, 55, 72), (140, 165, 195), (70, 80, 95)),
    roof=(80, 70, 70),
    vegetation=(62, 122, 48),
    terrain=((140, 160, 80),),
    pole=(118, 120, 126),
    car_colors=((200, 32, 32), (35, 62, 165), (222, 222, 228), (38, 38, 44), (152, 152, 162), (25, 105, 65),
                (230, 182, 45), (120, 30, 40)),
    clutter_colors=((40, 80, 50), (85, 85, 90), (150, 110, 60)),
    brightness=(0.85, 1.15),
    contrast=(0.9, 1.15),
    tint=(1.0, 1.0, 1.0),
    gradient=(0.0, 0.3),
    blur_sigma=(0.4, 0.8),
    noise_sigma=(2.0, 5.0),
)

RURAL_STYLE = DomainStyle(
    name="rural",
    horizon=(0.44, 0.56),
    road_half_width=(0.9, 1.3),
    sidewalk_prob=0.25,
    sidewalk_width=(0.3, 0.5),
    wall_setback=(0.8, 4.0),
    wall_kinds=(0.12, 0.48, 0.40),
    building_height=(1.6, 3.0),
    hedge_height=(1.5, 5.0),
    ground_fill="terrain",
    n_cars=1.3,
    n_trucks=0.6,
    n_persons=0.8,
    n_bicycles=0.3,
    n_poles=2.4,
    n_trees=3.0,
    n_clutter=0.6,
    sign_prob=0.25,
    sky_top=(72, 62, 125),
    sky_horizon=(245, 158, 92),
    cloud=(205, 120, 120),
    road=(82, 78, 78),
    lane_mark=(215, 185, 60),
    sidewalk=(150, 140, 125),
    building_colors=((175, 70, 55), (205, 195, 165), (150, 120, 90)),
    window_colors=((235, 195, 110), (50, 45, 50)),
    roof=(92, 52, 42),
    vegetation=(48, 82, 38),
    terrain=((150, 150, 72), (118, 138, 58), (165, 140, 85)),
    pole=(112, 82, 52),
    car_colors=((200, 32, 32), (35, 62, 165), (222, 222, 228), (38, 38, 44), (152, 152, 162), (25, 105, 65)),
    clutter_colors=((205, 175, 90), (190, 160, 80)),
    brightness=(0.68, 0.9),
    contrast=(0.65, 0.85),
    tint=(1.08, 0.95, 0.80),
    gradient=(0.15, 0.45),
    blur_sigma=(0.5, 1.0),
    noise_sigma=(3.0, 7.0),
)

STYLES = {"city": CITY_STYLE, "rural": RURAL_STYLE}

# shared object palettes (RGB)
SKIN = ((230, 185, 155), (200, 150, 115), (140, 95, 65), (95, 65, 45))
PANTS = ((40, 48, 80), (55, 55, 58), (30, 30, 32), (110, 95, 75))
HAIR = ((30, 25, 20), (80, 55, 30), (160, 130, 80))
TYRE = (28, 28, 30)
GLASS = (42, 55, 70)

"""Pure drawing of synthetic street scenes: a numpy Generator in, (image, label, instances) out.

The camera looks along a straight or gently bending road (see ``canvas.Street`` for the world model).
Side walls of buildings or trees, road markings, paving tiles and field furrows are laid out in world
coordinates, so they recede towards one vanishing point, and objects grow towards the bottom.

Drawing goes back to front: sky, distant skyline, ground, side walls, then every object (cars, trucks,
persons, bicycles, poles with signs, trees, void clutter) sorted far to near, so nearer objects occlude
farther ones. Labels and instance ids are drawn together with the colours; a thing's visible mask is
whatever is left of it in the instance map at the end. Textures, lighting, blur and noise come last.

Nothing here touches the disk or global random state: the same Generator state gives the same arrays.
"""
from typing import List, NamedTuple, Tuple

import cv2
import numpy as np

from .canvas import Canvas, FastRandom, Street, frac, grid, jitter_color, pick, smooth_noise, vivid_color
from .classes import DOMAIN_CLASSES, IGNORE_LABEL, IMAGE_HEIGHT, IMAGE_WIDTH
from .styles import GLASS, HAIR, PANTS, SKIN, STYLES, TYRE

__all__ = ["Scene", "MIN_INSTANCE_AREA", "draw_scene"]

# Thing fragments smaller than this (after occlusion) are not annotated; their pixels become ignore.
MIN_INSTANCE_AREA = 12

_CLS = {name: i for i, name in enumerate(DOMAIN_CLASSES["rural"])}  # city ids are a prefix of these
_WHITE = (235.0, 235.0, 230.0)
_RED = (205.0, 30.0, 35.0)


class Scene(NamedTuple):
    image: np.ndarray  # H x W x 3 uint8, RGB
    label: np.ndarray  # H x W uint8 train ids, IGNORE_LABEL = ignore
    instances: List[Tuple[int, np.ndarray]]  # (train id, H x W bool visible mask), in drawing order


# ------------------------------------------------------------------------------------- background
def _draw_sky(cv, rng, style, street):
    h = cv.h
    rows = np.clip(np.arange(h, dtype=np.float32) / max(street.yh, 1.0), 0, 1) ** np.float32(rng.uniform(0.8, 1.6))
    top, bottom = jitter_color(rng, style.sky_top, 0.08, 6), jitter_color(rng, style.sky_horizon, 0.06, 6)
    col = top[None, :] * (1 - rows[:, None]) + bottom[None, :] * rows[:, None]  # H x 3
    cloudiness = rng.uniform(0.0, 0.8)
    clouds = np.clip((cv.tex[0] * 0.5 + 0.5 - rng.uniform(0.45, 0.8)) * 2.5, 0, 1) * np.float32(cloudiness)
    cloud = jitter_color(rng, style.cloud, 0.05, 5)
    for c in range(3):
        cv.planes[c] = col[:, c:c + 1] * (1 - clouds) + cloud[c] * clouds
    cv.meta[:] = cv.packed(_CLS["sky"], (0.0, 0.0, 0.02), 0)


def _draw_skyline(cv, rng, style, street):
    """Far buildings (city) or a far tree line with a few farm houses (rural) on the horizon."""
    yh = street.yh
    if style.name == "city":
        x = -rng.uniform(0, 20)
        while x < cv.w:
            bw = rng.uniform(14, 45)
            top = yh - rng.uniform(3, 26)
            hazy = 0.55 * jitter_color(rng, pick(rng, style.building_colors), 0.1, 6) + 0.45 * jitter_color(
                rng, style.sky_horizon, 0.02, 2)
            cv.rect(x, top, x + bw, yh + 2, _CLS["building"], hazy, (0.02, 0.03, 0.02))
            x += bw * rng.uniform(0.6, 1.0)
        return
    yy, _ = grid(cv.h, cv.w)
    height = rng.uniform(3, 10) + 4 * smooth_noise(rng, 1, cv.w, int(rng.integers(8, 40)))[0]
    mask = (yy >= (yh - np.maximum(height, 1.0))[None, :]) & (yy <= yh + 1)
    far = 0.7 * jitter_color(rng, style.vegetation, 0.1, 5) + 0.3 * jitter_color(rng, style.sky_horizon, 0.02, 2)
    cv.fill(mask, _CLS["vegetation"], far, (0.05, 0.12, 0.05))
    for _ in range(int(rng.poisson(0.8))):
        cx, bw, bh = rng.uniform(0, cv.w), rng.uniform(5, 12), rng.uniform(3, 7)
        wall = jitter_color(rng, pick(rng, style.building_colors), 0.1, 5)
        cv.rect(cx, yh - bh, cx + bw, yh + 1, _CLS["building"], wall)
        cv.polygon([(cx - 1, yh - bh), (cx + bw / 2, yh - bh - bw * 0.4), (cx + bw + 1, yh - bh)], _CLS["building"],
                   jitter_color(rng, style.roof, 0.1, 5))


def _draw_far_block(cv, rng, style, street):
    """City: front-facing buildings closing the street where the side walls end."""
    t_far = 0.11
    xl, xr = street.x_at(t_far, -(street.R + 6)), street.x_at(t_far, street.R + 6)
    base, sc = street.y_at(t_far), street.scale(t_far)
    yy, xx = grid(cv.h, cv.w)
    x = xl
    while x < xr:
        bw = rng.uniform(1.5, 4.0) * sc
        top = base - rng.uniform(2.0, 7.0) * sc
        cv.rect(x, top, x + bw, base, _CLS["building"], jitter_color(rng, pick(rng, style.building_colors), 0.1, 8),
                (0.02, 0.03, 0.03))
        period = 0.7 * sc
        win_color = jitter_color(rng, pick(rng, style.window_colors), 0.1, 5)
        ya, yb = max(int(np.ceil(top)) + 1, 0), min(int(base) - 2, cv.h)
        xa, xb = max(int(np.ceil(x)) + 1, 0), min(int(x + bw) - 1, cv.w)
        if period >= 2.5 and ya < yb and xa < xb:  # a window grid, only where it is large enough to see
            m = np.zeros((cv.h, cv.w), bool)
            m[ya:yb, xa:xb] = ((frac((xx[ya:yb, xa:xb] - x) / period) < 0.5)
                               & (frac((yy[ya:yb, xa:xb] - top) / period) > 0.45))
            cv.fill(m, None, win_color, (0.02, 0.03, 0.02))
        x += bw


def _draw_ground(cv, rng, style, street):
    rows, t, s, z = street.ground_coords()  # only the rows below the horizon
    a = np.abs(s)
    R, (swl, swr) = street.R, street.sw
    left = s < 0
    if style.ground_fill == "terrain":
        # fields with furrows running towards the vanishing point, a different field on each side
        for half in (left, ~left):
            c1, c2 = (jitter_color(rng, pick(rng, style.terrain), 0.1, 6) for _ in range(2))
            furrow = frac(s * rng.uniform(0.3, 1.0) + rng.uniform(0, 1)) < rng.uniform(0.35, 0.65)
            cv.fill(half & furrow, _CLS["terrain"], c1, (0.08, 0.10, 0.06), rows=rows)
            cv.fill(half & ~furrow, _CLS["terrain"], c2, (0.08, 0.10, 0.06), rows=rows)
    else:
        cv.fill(np.ones_like(left), _CLS[style.ground_fill], jitter_color(rng, style.sidewalk, 0.08, 5),
                (0.03, 0.04, 0.04), rows=rows)

    # sidewalks with paving joints and a bright curb; gravel shoulders (terrain) where there is none
    sw_col = jitter_color(rng, style.sidewalk, 0.08, 5)
    tile_z, tile_s = rng.uniform(2.0, 5.0), rng.uniform(1.5, 4.0)
    gravel = jitter_color(rng, (140, 125, 105), 0.1, 5)
    outside = a > R
    for side_mask, width in ((left, swl), (~left, swr)):
        if width > 0:
            walk = side_mask & outside & (a <= R + width)
            cv.fill(walk, _CLS["sidewalk"], sw_col, (0.03, 0.05, 0.05), rows=rows)
            joints = walk & ((frac(z * tile_z) < 0.12) | (frac(a * tile_s) < 0.1)) & (t > 0.15)
            cv.scale_colors(joints, 0.85, rows=rows)
            cv.scale_colors(walk & (a < R + 0.1), 1.18, rows=rows)
        elif style.ground_fill == "terrain":
            cv.fill(side_mask & outside & (a <= R + 0.2), _CLS["terrain"], gravel, (0.05, 0.05, 0.1), rows=rows)

    # asphalt, then markings (still road)
    road = ~outside
    cv.fill(road, _CLS["road"], jitter_color(rng, style.road, 0.1, 4), (0.06, 0.03, 0.06), rows=rows)
    width = rng.uniform(0.05, 0.09)
    dashed = frac(z * rng.uniform(1.0, 2.0) + rng.uniform(0, 1)) < 0.45
    marks = a < width
    if style.name == "city":
        marks = marks & dashed
        if R > 1.5:
            marks |= (np.abs(a - R / 2) < width) & dashed
    if rng.random() < 0.6:
        marks |= np.abs(a - (R - 0.12)) < width * 0.8
    if style.name == "city" and rng.random() < 0.25:  # zebra crossing
        zc = rng.uniform(1.3, 4.0)
        marks |= (np.abs(z - zc) < 0.18 * zc) & (frac(s * 2.2) < 0.5)
    cv.fill(road & marks & (t > 0.06), None, jitter_color(rng, style.lane_mark, 0.06, 4), (0.02, 0.03, 0.05),
            rows=rows)


def _draw_side_walls(cv, rng, style, street):
    """Rows of buildings / hedges / gaps along both sides, receding towards the vanishing point.

    A wall segment between depths ``za`` and ``zb`` (z = 1/t) is a polygon through its base and top
    lines sampled in depth; windows are quads of a grid in wall coordinates (depth, height). Everything
    is computed for all segments of a side at once.
    """
    t_min = rng.uniform(0.07, 0.12)
    z_start, z_end = 0.25, 1.0 / t_min  # from well below the image (t = 4) to the far end of the street
    samples = np.linspace(0.0, 1.0, 12)
    building_tex, veg_tex, window_tex = (0.025, 0.04, 0.02), (0.1, 0.16, 0.08), (0.02, 0.04, 0.02)
    roof_band = 0.6 if style.name == "rural" else 0.0
    for side in (-1, 1):
        i = 0 if side < 0 else 1
        lateral = side * (street.R + street.sw[i] + street.setback[i])
        bounds = [z_start]
        while bounds[-1] < z_end:
            bounds.append(min(bounds[-1] + rng.uniform(0.6, 1.6) * max(1.0, 0.55 * bounds[-1]), z_end))
        za, zb = np.array(bounds[:-1]), np.array(bounds[1:])
        n = len(za)
        kinds = rng.choice(3, size=n, p=style.wall_kinds)  # 0 building, 1 vegetation, 2 gap
        is_b = kinds == 0
        heights = np.where(is_b, rng.uniform(*style.building_height, n), rng.uniform(*style.hedge_height, n))
        palette = np.asarray(style.building_colors)
        veg = np.asarray(style.vegetation)[None, :]
        base = np.where(is_b[:, None], palette[rng.integers(len(palette), size=n)], veg)
        colors = base * np.where(is_b, rng.uniform(0.9, 1.1, n), rng.uniform(0.85, 1.15, n))[:, None]
        colors = np.clip(colors + rng.normal(0.0, 8.0, (n, 3)), 0, 255)
        ts = (1.0 / zb)[:, None] + (1.0 / za - 1.0 / zb)[:, None] * samples[None, :]  # n x 12, far to near
        xs, ys, sc = street.x_at(ts, lateral), street.y_at(ts), street.scale(ts)
        ragged = np.where(kinds[:, None] == 1, rng.uniform(-0.4, 0.4, ts.shape), 0.0)  # foliage outline
        top = ys - (heights[:, None] + ragged) * sc
        colors *= (0.88 + 0.17 * np.minimum(ts.mean(1), 1.0))[:, None]  # nearer walls a little brighter
        roof_low = np.minimum(top + roof_band * sc, cv.h + 2.0)
        # clamp to just outside the image: a wall is a vertical extrusion of its base line, so this keeps
        # the visible part and spares cv2 from walking thousands of off-screen rows
        top_c, ys_c = np.maximum(top, -2.0), np.minimum(ys, cv.h + 2.0)
        outlines = np.concatenate([np.stack([xs, top_c], -1), np.stack([xs, ys_c], -1)[:, ::-1]], 1)
        for k in np.flatnonzero(kinds != 2):
            cls, tex = (_CLS["building"], building_tex) if is_b[k] else (_CLS["vegetation"], veg_tex)
            cv.polygon(outlines[k], cls, colors[k], tex)
            if is_b[k] and roof_band:
                low = np.maximum(roof_low[k], top_c[k])
                roof = np.concatenate([np.stack([xs[k], top_c[k]], 1), np.stack([xs[k], low], 1)[::-1]])
                cv.polygon(roof, _CLS["building"], jitter_color(rng, style.roof, 0.05, 3), tex)
        if not is_b.any():
            continue
        # windows: columns j cover depths [j, j + 0.55] / f, floors cover heights [(i + 0.3), (i + 0.75)] * fv
        f, fv = rng.uniform(1.5, 4.0, n), rng.uniform(1.4, 2.2, n)
        ncol = int(np.ceil(((zb - za) * f).max())) + 1
        js = np.floor(za * f)[:, None] + np.arange(ncol)[None, :]
        z0, z1 = np.maximum(js / f[:, None], za[:, None]), np.minimum((js + 0.55) / f[:, None], zb[:, None])
        col_ok = is_b[:, None] & (z1 > z0) & (0.45 * fv[:, None] * street.scale(1.0 / z1) >= 1.2)  # visible ones
        floors = np.arange(int(np.floor(heights.max() / fv.min())) + 1)[None, :]
        v0, v1 = (floors + 0.3) * fv[:, None], (floors + 0.75) * fv[:, None]
        floor_ok = (v0 > 0.25) & (v1 < heights[:, None] - 0.4 - roof_band)
        ok = col_ok[:, :, None] & floor_ok[:, None, :]  # segment x column x floor
        if not ok.any():
            continue
        t0, t1 = (1.0 / z0)[:, :, None], (1.0 / z1)[:, :, None]  # near and far edge of each window column
        v0, v1 = v0[:, None, :], v1[:, None, :]
        x0, x1 = street.x_at(t0, lateral), street.x_at(t1, lateral)
        y0, y1, s0, s1 = street.y_at(t0), street.y_at(t1), street.scale(t0), street.scale(t1)
        corners = [(x0, y0 - v0 * s0), (x1, y1 - v0 * s1), (x1, y1 - v1 * s1), (x0, y0 - v1 * s0)]
        quads = np.stack([np.stack(np.broadcast_arrays(x, y), -1) for x, y in corners], -2)  # n x J x F x 4 x 2
        palette_idx = rng.integers(len(style.window_colors), size=n)
        for g, base_color in enumerate(style.window_colors):
            sel = ok & (palette_idx == g)[:, None, None]
            if sel.any():
                cv.polygons(quads[sel], _CLS["building"], jitter_color(rng, base_color, 0.1, 5), window_tex)


# ----------------------------------------------------------------------------------------- objects
def _draw_car(cv, rng, style, x, y, sc, inst, oncoming):
    w, h = rng.uniform(1.05, 1.3) * sc, rng.uniform(0.85, 1.15) * sc
    body = jitter_color(rng, pick(rng, style.car_colors), 0.1, 6)
    cls, tex = _CLS["car"], (0.03, 0.03, 0.02)
    cv.shade_ellipse(x, y - 0.02 * sc, 0.55 * w, max(0.12 * sc, 1.0), 0.55)
    tyre = jitter_color(rng, TYRE, 0.1, 2)
    for dx in (-0.36 * w, 0.36 * w):
        cv.rect(x + dx - 0.1 * w, y - 0.22 * h, x + dx + 0.1 * w, y, cls, tyre, tex, inst)
    cv.polygon([(x - 0.5 * w, y - 0.15 * h), (x - 0.5 * w, y - 0.55 * h), (x - 0.44 * w, y - 0.62 * h),
                (x + 0.44 * w, y - 0.62 * h), (x + 0.5 * w, y - 0.55 * h), (x + 0.5 * w, y - 0.15 * h)],
               cls, body, tex, inst)
    cv.polygon([(x - 0.44 * w, y - 0.6 * h), (x - 0.34 * w, y - h), (x + 0.34 * w, y - h), (x + 0.44 * w, y - 0.6 * h)],
               cls, body * 0.92, tex, inst)
    cv.polygon([(x - 0.38 * w, y - 0.64 * h), (x - 0.3 * w, y - 0.93 * h), (x + 0.3 * w, y - 0.93 * h),
                (x + 0.38 * w, y - 0.64 * h)], cls, jitter_color(rng, GLASS, 0.15, 4), (0.02, 0.05, 0.02), inst)
    cv.rect(x - 0.5 * w, y - 0.24 * h, x + 0.5 * w, y - 0.15 * h, cls, body * 0.45, tex, inst)  # bumper
    light = (245.0, 235.0, 200.0) if oncoming else (215.0, 30.0, 30.0)
    for dx in (-0.42 * w, 0.42 * w):
        cv.rect(x + dx - 0.06 * w, y - 0.5 * h, x + dx + 0.06 * w, y - 0.4 * h, cls, light, tex, inst)
    cv.rect(x - 0.12 * w, y - 0.42 * h, x + 0.12 * w, y - 0.32 * h, cls, (225.0, 225.0, 215.0), tex, inst)  # plate


def _draw_truck(cv, rng, style, x, y, sc, inst):
    w, h = rng.uniform(1.5, 1.75) * sc, rng.uniform(2.0, 2.6) * sc
    cls, tex = _CLS["truck"], (0.03, 0.04, 0.02)
    box = jitter_color(rng, pick(rng, ((215, 215, 210), (185, 45, 35), (45, 95, 155), (200, 160, 50))), 0.1, 6)
    cv.shade_ellipse(x, y - 0.02 * sc, 0.55 * w, max(0.12 * sc, 1.0), 0.55)
    tyre = jitter_color(rng, TYRE, 0.1, 2)
    for dx in (-0.38 * w, -0.26 * w, 0.26 * w, 0.38 * w):
        cv.rect(x + dx - 0.055 * w, y - 0.18 * h, x + dx + 0.055 * w, y, cls, tyre, tex, inst)
    cv.rect(x - 0.5 * w, y - h, x + 0.5 * w, y - 0.16 * h, cls, box, tex, inst)
    # rear doors: a dark split and hinge bars, then a bumper and lights
    cv.rect(x - 0.012 * w - 0.3, y - 0.95 * h, x + 0.012 * w + 0.3, y - 0.2 * h, cls, box * 0.55, tex, inst)
    for fy in (0.35, 0.65):
        cv.rect(x - 0.46 * w, y - (fy + 0.012) * h, x + 0.46 * w, y - (fy - 0.012) * h, cls, box * 0.75, tex, inst)
    cv.rect(x - 0.5 * w, y - 0.2 * h, x + 0.5 * w, y - 0.14 * h, cls, (40.0, 40.0, 40.0), tex, inst)
    for dx in (-0.44 * w, 0.44 * w):
        cv.rect(x + dx - 0.04 * w, y - 0.26 * h, x + dx + 0.04 * w, y - 0.21 * h, cls, (215.0, 40.0, 30.0), tex, inst)


def _draw_person(cv, rng, x, y, sc, inst, height=None):
    h = (height if height is not None else rng.uniform(1.0, 1.2)) * sc
    cls, tex = _CLS["person"], (0.02, 0.04, 0.03)
    skin = jitter_color(rng, pick(rng, SKIN), 0.08, 4)
    shirt = vivid_color(rng) if rng.random() < 0.7 else jitter_color(rng, (200, 200, 195), 0.2, 8)
    pants = jitter_color(rng, pick(rng, PANTS), 0.1, 5)
    stride = rng.uniform(-0.09, 0.09) * h
    lw = max(0.07 * h, 0.6)
    for side in (-1, 1):  # legs
        hip = x + side * 0.055 * h
        foot = hip + side * stride
        cv.polygon([(hip - lw, y - 0.48 * h), (hip + lw, y - 0.48 * h), (foot + lw * 0.8, y), (foot - lw * 0.8, y)],
                   cls, pants, tex, inst)
    swing = rng.uniform(-0.12, 0.12) * h
    for side in (-1, 1):  # arms
        cv.line((x + side * 0.12 * h, y - 0.78 * h), (x + side * (0.15 * h + 0.3 * swing), y - 0.47 * h),
                max(0.06 * h, 1.0), cls, shirt * 0.9, tex, inst)
    cv.polygon([(x - 0.13 * h, y - 0.8 * h), (x + 0.13 * h, y - 0.8 * h), (x + 0.11 * h, y - 0.45 * h),
                (x - 0.11 * h, y - 0.45 * h)], cls, shirt, tex, inst)
    r = max(0.075 * h, 0.7)
    cv.ellipse(x, y - 0.89 * h, r, r * 1.15, cls, skin, tex, inst)
    cv.ellipse(x, y - 0.89 * h - 0.5 * r, r * 1.02, r * 0.7, cls, jitter_color(rng, pick(rng, HAIR), 0.1, 4), tex, inst)


def _draw_bicycle(cv, rng, x, y, sc, inst):
    """Side view: two wheels and a diamond frame; ``x`` is the middle between the hubs."""
    cls, tex = _CLS["bicycle"], (0.02, 0.03, 0.02)
    L, r = rng.uniform(1.0, 1.15) * sc, 0.23 * sc
    d = 1 if rng.random() < 0.5 else -1
    frame, tyre = vivid_color(rng), jitter_color(rng, TYRE, 0.1, 2)
    rear, front = (x - d * 0.38 * L, y - r), (x + d * 0.38 * L, y - r)
    for hub in (rear, front):
        cv.ellipse(hub[0], hub[1], r, r, cls, tyre, tex, inst, thickness=max(int(round(0.035 * sc)), 1))
    bb = (x - d * 0.04 * L, y - r)
    seat = (x - d * 0.15 * L, y - r - 0.42 * L)
    head = (x + d * 0.25 * L, y - r - 0.4 * L)
    fw = max(0.03 * sc, 1.0)
    for p, q in ((rear, bb), (rear, seat), (bb, seat), (seat, head), (bb, head), (head, front)):
        cv.line(p, q, fw, cls, frame, tex, inst)
    cv.line((seat[0] - d * 0.06 * L, seat[1] - 0.03 * L), (seat[0] + d * 0.06 * L, seat[1] - 0.03 * L), fw, cls, tyre,
            tex, inst)
    cv.line(head, (head[0] - d * 0.05 * L, head[1] - 0.08 * L), fw, cls, frame, tex, inst)


def _draw_pole(cv, rng, style, x, y, sc, toward_road):
    """A street light / utility pole with an optional traffic sign (both stuff classes)."""
    pole, sign = _CLS["pole"], _CLS["traffic sign"]
    h, w = rng.uniform(3.5, 6.0) * sc, max(rng.uniform(0.035, 0.06) * sc, 0.8)
    col = jitter_color(rng, style.pole, 0.1, 5)
    tex = (0.02, 0.05, 0.05)
    cv.rect(x - w / 2, y - h, x + w / 2, y, pole, col, tex)
    if style.name == "city" and rng.random() < 0.4:  # street light: arm and lamp
        tip = (x + toward_road * 0.7 * sc, y - h + 0.15 * sc)
        cv.line((x, y - h + 0.05 * sc), tip, max(w * 0.7, 1.0), pole, col, tex)
        cv.rect(tip[0] - 0.12 * sc, tip[1] - 0.04 * sc, tip[0] + 0.12 * sc, tip[1] + 0.05 * sc, pole, col * 0.8, tex)
    elif style.name == "rural":  # cross bar of a utility pole
        cv.rect(x - 0.35 * sc, y - h + 0.2 * sc, x + 0.35 * sc, y - h + 0.2 * sc + max(0.05 * sc, 1.0), pole, col, tex)
    if rng.random() >= style.sign_prob:
        return
    cy, r = y - rng.uniform(2.0, 2.8) * sc, rng.uniform(0.2, 0.3) * sc
    kind = int(rng.integers(4))
    stex = (0.01, 0.02, 0.02)
    if kind == 0:  # prohibitory: red ring, white inside
        cv.ellipse(x, cy, r, r, sign, _RED, stex)
        cv.ellipse(x, cy, r * 0.68, r * 0.68, sign, _WHITE, stex)
    elif kind == 1:  # mandatory: blue disc with a white arrow
        cv.ellipse(x, cy, r, r, sign, (30.0, 75.0, 175.0), stex)
        cv.line((x, cy + 0.5 * r), (x, cy - 0.5 * r), max(0.2 * r, 1.0), sign, _WHITE, stex)
    elif kind == 2:  # warning: red-bordered triangle
        cv.polygon([(x - r * 1.1, cy + r * 0.8), (x + r * 1.1, cy + r * 0.8), (x, cy - r * 1.1)], sign, _RED, stex)
        cv.polygon([(x - r * 0.65, cy + r * 0.55), (x + r * 0.65, cy + r * 0.55), (x, cy - r * 0.55)], sign, _WHITE,
                   stex)
    elif style.name == "city":  # information: blue rectangle
        cv.rect(x - r, cy - r * 0.8, x + r, cy + r * 0.8, sign, (35.0, 90.0, 175.0), stex)
    else:  # yellow diamond
        cv.polygon([(x - r, cy), (x, cy - r), (x + r, cy), (x, cy + r)], sign, (235.0, 195.0, 35.0), stex)


def _draw_tree(cv, rng, style, x, y, sc):
    cls = _CLS["vegetation"]  # trunks count as vegetation, as in the usual street-scene labelling
    trunk_h, tw = rng.uniform(1.2, 2.4) * sc, max(rng.uniform(0.1, 0.18) * sc, 0.8)
    cv.rect(x - tw / 2, y - trunk_h, x + tw / 2, y, cls, jitter_color(rng, (92, 70, 50), 0.12, 5), (0.03, 0.06, 0.05))
    cr = rng.uniform(0.7, 1.5) * sc
    cy = y - trunk_h - 0.6 * cr
    green = jitter_color(rng, style.vegetation, 0.15, 8)
    for _ in range(int(rng.integers(3, 7))):
        ox, oy = rng.normal(0, 0.45 * cr), rng.normal(0, 0.35 * cr)
        cv.ellipse(x + ox, cy + oy, cr * rng.uniform(0.5, 0.8), cr * rng.uniform(0.45, 0.7), cls,
                   green * np.float32(rng.uniform(0.85, 1.1)), (0.05, 0.2, 0.08))


def _draw_clutter(cv, rng, style, x, y, sc):
    """Void objects (bins, hay bales): ignore in the label, occluding whatever is behind."""
    col = jitter_color(rng, pick(rng, style.clutter_colors), 0.1, 6)
    if style.name == "city":
        w, h = rng.uniform(0.3, 0.45) * sc, rng.uniform(0.5, 0.75) * sc
        cv.rect(x - w / 2, y - h, x + w / 2, y, IGNORE_LABEL, col, (0.03, 0.05, 0.03))
        cv.rect(x - w * 0.55, y - h - 0.06 * sc, x + w * 0.55, y - h + 0.02 * sc, IGNORE_LABEL, col * 0.7)
    else:
        r = rng.uniform(0.3, 0.45) * sc
        cv.ellipse(x, y - r, r * 1.3, r, IGNORE_LABEL, col, (0.05, 0.12, 0.1))


def _depth(rng, power=1.4):
    """Ground depth of an object: from far (0.1) to just past the bottom edge, near ones rarer."""
    return 0.1 + 0.95 * rng.random() ** power


def _place_objects(rng, style, street):
    """(depth t, lateral s, kind, extra) of every object, unsorted."""
    R, sw = street.R, street.sw
    objs, vehicles = [], []

    def side_of():
        return -1 if rng.random() < 0.5 else 1

    for kind, lam in (("car", style.n_cars), ("truck", style.n_trucks)):
        for _ in range(int(rng.poisson(lam))):
            for _try in range(4):  # avoid two vehicles in the same spot
                t, side = _depth(rng, 1.8), side_of()
                if kind == "car" and style.name == "city" and rng.random() < 0.3:
                    s = side * (R - 0.65)  # parked at the curb
                else:
                    s = side * R * 0.5 + rng.normal(0, 0.08)
                if all(abs(s - s2) > 1.2 or abs(1 / t - 1 / t2) > 0.9 for t2, s2 in vehicles):
                    vehicles.append((t, s))
                    objs.append((t, s, kind, side < 0))
                    break
    for _ in range(int(rng.poisson(style.n_persons))):
        t, side = _depth(rng, 2.2), side_of()
        width = sw[0 if side < 0 else 1]
        if style.name == "city" and rng.random() < 0.12:
            s = rng.uniform(-R, R)  # crossing the road
        elif width > 0:
            s = side * (R + rng.uniform(0.15, max(width - 0.1, 0.2)))
        else:
            s = side * (R + rng.uniform(0.05, 0.6))
        objs.append((t, s, "person", None))
    for _ in range(int(rng.poisson(style.n_bicycles))):
        t, side = _depth(rng), side_of()
        width = sw[0 if side < 0 else 1]
        if width > 0.3 and rng.random() < 0.5:
            objs.append((t, side * (R + rng.uniform(0.3, width)), "bicycle", False))  # parked
        else:
            objs.append((t, side * (R - 0.3), "bicycle", True))  # ridden along the road edge
    for _ in range(int(rng.poisson(style.n_poles))):
        t, side = _depth(rng, 1.6), side_of()
        width = sw[0 if side < 0 else 1]
        s = side * (R + 0.2) if style.name == "city" else side * (R + width + rng.uniform(0.4, 1.2))
        objs.append((t, s, "pole", -side))
    for _ in range(int(rng.poisson(style.n_trees))):
        t, side = _depth(rng), side_of()
        i = 0 if side < 0 else 1
        if style.name == "city":
            s = side * (R + sw[i] * 0.65)
        else:
            s = side * (R + sw[i] + rng.uniform(0.6, 1.0 + street.setback[i]))
        objs.append((t, s, "tree", None))
    for _ in range(int(rng.poisson(style.n_clutter))):
        t, side = _depth(rng), side_of()
        i = 0 if side < 0 else 1
        if style.name == "city":
            s = side * (R + rng.uniform(0.2, max(sw[i] - 0.2, 0.3)))
        else:
            s = side * (R + sw[i] + rng.uniform(0.5, 3.0))
        objs.append((t, s, "clutter", None))
    return objs


# -------------------------------------------------------------------------------------- finishing
def _photometric(cv, rng, style):
    """Textures, a lighting gradient, global contrast / brightness / tint, blur and sensor noise."""
    h, w = cv.h, cv.w
    yy, xx = grid(h, w)
    if style.name == "rural":  # dusk: the light comes from the low sun near the horizon, left or right
        theta = (rng.uniform(0.6, 1.0) * (-1 if rng.random() < 0.5 else 1) - 1.0) * np.pi / 2
    else:
        theta = rng.uniform(0, 2 * np.pi)
    a = 2 * rng.uniform(*style.gradient)
    gx, gy = np.float32(a * np.cos(theta) / w), np.float32(a * np.sin(theta) / h)
    light = cv.texture_shade()
    light *= 1.0 + (gx * xx + gy * yy - np.float32(0.5 * (a * np.cos(theta) + a * np.sin(theta))))
    mean = float(cv.planes.mean())  # of the untextured colours: close enough, and cheaper
    contrast, brightness = rng.uniform(*style.contrast), rng.uniform(*style.brightness)
    tint = np.asarray(style.tint) + rng.normal(0, 0.03, 3)
    sigma_blur = rng.uniform(*style.blur_sigma)
    sigma = np.float32(rng.uniform(*style.noise_sigma))
    # sensor noise: uniform with the wanted standard deviation (much cheaper to draw than Gaussian)
    spread = sigma * np.float32(12**0.5)
    luminance = (rng.random((h, w), dtype=np.float32) - np.float32(0.5)) * spread
    chroma = (rng.random((3, h // 4, w // 4), dtype=np.float32) - np.float32(0.5)) * (spread * np.float32(0.5))
    out = []
    for c in range(3):
        p = cv.planes[c] * light
        p *= np.float32(contrast * tint[c])
        p += np.float32(mean * (brightness - contrast) * tint[c] + 0.5)
        p = cv2.GaussianBlur(p, (0, 0), sigma_blur)
        p += luminance
        p += cv2.resize(chroma[c], (w, h), interpolation=cv2.INTER_LINEAR)  # blotchy colour noise
        out.append(np.clip(p, 0, 255).astype(np.uint8))
    return cv2.merge(out)


def draw_scene(rng: np.random.Generator, domain: str, height: int = IMAGE_HEIGHT, width: int = IMAGE_WIDTH) -> Scene:
    """Draw one scene of ``domain`` ("city" or "rural") from ``rng``.

    Returns the RGB image, the train-id label map (255 = ignore: void clutter, thing fragments under
    ``MIN_INSTANCE_AREA`` pixels and a one-pixel band around every thing) and the visible mask of every
    annotated thing instance. Every thing pixel in the label belongs to exactly one returned instance.
    """
    style = STYLES[domain]
    rng = FastRandom(rng)
    cv = Canvas(rng, height, width)
    street = Street(rng, style, height, width)
    _draw_sky(cv, rng, style, street)
    _draw_skyline(cv, rng, style, street)
    if style.name == "city":
        _draw_far_block(cv, rng, style, street)
    _draw_ground(cv, rng, style, street)
    _draw_side_walls(cv, rng, style, street)

    things = []  # (instance id, train id)

    def new_thing(name):
        things.append((len(things) + 1, _CLS[name]))
        return len(things)

    for t, s, kind, extra in sorted(_place_objects(rng, style, street), key=lambda o: (o[0], o[1])):
        x, y, sc = street.x_at(t, s), street.y_at(t), street.scale(t)
        if kind == "car":
            _draw_car(cv, rng, style, x, y, sc, new_thing("car"), oncoming=extra)
        elif kind == "truck":
            _draw_truck(cv, rng, style, x, y, sc, new_thing("truck"))
        elif kind == "person":
            _draw_person(cv, rng, x, y, sc, new_thing("person"))
        elif kind == "bicycle":
            _draw_bicycle(cv, rng, x, y, sc, new_thing("bicycle"))
            if extra:  # a rider: its own person instance, in front of the bicycle
                _draw_person(cv, rng, x, y - 0.12 * sc, sc, new_thing("person"), height=rng.uniform(0.95, 1.1))
        elif kind == "pole":
            _draw_pole(cv, rng, style, x, y, sc, extra)
        elif kind == "tree":
            _draw_tree(cv, rng, style, x, y, sc)
        else:
            _draw_clutter(cv, rng, style, x, y, sc)

    label, inst = cv.label, cv.inst
    instances, kept = [], np.zeros(label.shape, bool)
    if things:
        counts = np.bincount(inst.ravel(), minlength=len(things) + 1)
        for inst_id, cls in things:
            if counts[inst_id] == 0:
                continue
            visible = inst == inst_id
            if counts[inst_id] < MIN_INSTANCE_AREA:
                label[visible] = IGNORE_LABEL  # too small to annotate: ignore rather than unannotated
                continue
            instances.append((cls, visible))
            kept |= visible
    # a one-pixel ignore band just outside every annotated thing (its own pixels stay labelled)
    band = cv2.dilate(kept.view(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~kept
    label[band] = IGNORE_LABEL
    return Scene(_photometric(cv, rng, style), label, instances)

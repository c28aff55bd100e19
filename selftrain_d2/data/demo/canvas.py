"""Drawing surface, street geometry and random-number helpers used by scenes.py.

``Canvas`` holds aligned buffers that every shape is drawn into at once: the colour image, stored as
three separate planes (numpy is slow on a trailing axis of 3), and one packed int32 map holding the
train id, the texture profile and the instance id of every pixel. Shapes are drawn with cv2 straight
into the buffers (no per-shape masks), and textures are applied once at the end: a texture profile
says how strongly the pixel's colour is modulated by three shared noise fields (coarse, medium,
fine), so asphalt, foliage and car paint look different although they share the noise.

``Street`` is the tiny world model: ground depth ``t`` is 1 on the bottom image row and falls to 0 at
the horizon; a world unit (about the camera height) spans ``t * (H - horizon)`` pixels at depth ``t``;
``s`` is the lateral world position relative to the road centre line.
"""
from functools import lru_cache

import cv2
import numpy as np

from .classes import IGNORE_LABEL

__all__ = ["Canvas", "FastRandom", "Street", "frac", "grid", "smooth_noise", "jitter_color", "pick", "vivid_color"]

_SHIFT = 4  # cv2 drawing with 4 fractional bits: sub-pixel accurate shapes for small, far objects
_ONE = float(1 << _SHIFT)

# (coarse, medium, fine) noise amplitudes, relative to the colour
DEFAULT_TEXTURE = (0.04, 0.04, 0.03)


@lru_cache(maxsize=4)
def grid(h, w):
    """Row and column index arrays (float32, H x W); cached, never modify them."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def smooth_noise(rng, h, w, cell):
    """Smooth noise of roughly unit amplitude with features about ``cell`` pixels across."""
    small = rng.standard_normal((h // cell + 2, w // cell + 2)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


class FastRandom:
    """A numpy Generator whose scalar draws come from pre-drawn blocks.

    A scene needs a few hundred single random numbers, and numpy's per-call overhead (microseconds)
    would dominate them; array draws (``size=...``) go straight to the Generator. Everything stays a
    pure function of the Generator's state.
    """

    _BLOCK = 256

    def __init__(self, gen):
        self.gen = gen
        self._u, self._n = [], []

    def random(self, size=None, dtype=np.float64):
        if size is not None:
            return self.gen.random(size, dtype=dtype)
        if not self._u:
            self._u = self.gen.random(self._BLOCK).tolist()
        return self._u.pop()

    def uniform(self, low=0.0, high=1.0, size=None):
        if size is not None:
            return self.gen.uniform(low, high, size)
        return low + (high - low) * self.random()

    def normal(self, loc=0.0, scale=1.0, size=None):
        if size is not None:
            return self.gen.normal(loc, scale, size)
        if not self._n:
            self._n = self.gen.standard_normal(self._BLOCK).tolist()
        return loc + scale * self._n.pop()

    def integers(self, low, high=None, size=None):
        if size is not None:
            return self.gen.integers(low, high, size)
        if high is None:
            low, high = 0, low
        return low + min(int(self.random() * (high - low)), high - low - 1)

    def __getattr__(self, name):  # poisson, choice, standard_normal, ...
        return getattr(self.gen, name)


def jitter_color(rng, base, bright=0.12, hue=8.0):
    """A colour near ``base``: a random brightness scale plus a small per-channel shift."""
    k = rng.uniform(1.0 - bright, 1.0 + bright)
    return np.array([min(max(b * k + rng.normal(0.0, hue), 0.0), 255.0) for b in base], np.float32)


def frac(x):
    """Fractional part (x - floor(x)); much faster than np.mod(x, 1.0) on float arrays."""
    return x - np.floor(x)


def pick(rng, options):
    return options[int(rng.integers(len(options)))]


def vivid_color(rng):
    """A random saturated colour (clothes, bicycle frames)."""
    hsv = np.uint8([[[rng.integers(0, 180), rng.integers(120, 256), rng.integers(90, 240)]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _fixed(v):
    return int(round(float(v) * _ONE))


class Canvas:
    """Colour planes plus one packed int32 "meta" map per pixel: label | profile << 8 | instance << 16.

    Packing keeps every shape at four cv2 calls (three colour planes, one meta); ``label``, ``inst``
    and ``prof`` unpack it.
    """

    def __init__(self, rng, h, w):
        self.h, self.w = h, w
        self.planes = np.zeros((3, h, w), np.float32)  # R, G, B
        self.meta = np.full((h, w), IGNORE_LABEL, np.int32)
        self._profiles = {(0.0, 0.0, 0.0): 0}
        self.tex = np.stack([smooth_noise(rng, h, w, 24), smooth_noise(rng, h, w, 6), smooth_noise(rng, h, w, 2)])

    @property
    def label(self):
        return (self.meta & 0xFF).astype(np.uint8)

    @property
    def inst(self):
        return self.meta >> 16

    @property
    def prof(self):
        return (self.meta >> 8) & 0xFF

    def profile(self, tex):
        """Index of a texture profile (coarse, medium, fine noise amplitudes)."""
        key = tuple(float(a) for a in tex)
        idx = self._profiles.get(key)
        if idx is None:
            idx = self._profiles[key] = len(self._profiles)
        return idx

    def packed(self, cls, tex, inst):
        return int(cls) | (self.profile(tex) << 8) | (int(inst) << 16)

    # ---- shapes: colour, label, texture profile and instance id drawn together
    def _draw(self, fn, cls, color, tex, inst):
        for plane, c in zip(self.planes, color):
            fn(plane, float(c))
        fn(self.meta, self.packed(cls, tex, inst))

    def polygons(self, polys, cls, color, tex=DEFAULT_TEXTURE, inst=0):
        """Fill several non-overlapping polygons (a list or an N x K x 2 array of points) in one go."""
        if isinstance(polys, np.ndarray):  # N x K x 2: convert all at once, dropping off-screen ones
            lo, hi = polys.min(1), polys.max(1)
            polys = polys[(hi[:, 0] >= -1) & (lo[:, 0] <= self.w) & (hi[:, 1] >= -1) & (lo[:, 1] <= self.h)]
            if len(polys) == 0:
                return
            p = list(np.round(polys * _ONE).astype(np.int32))
        else:
            p = [np.round(np.asarray(q, np.float64) * _ONE).astype(np.int32) for q in polys]
        self._draw(lambda buf, v: cv2.fillPoly(buf, p, v, cv2.LINE_8, _SHIFT), cls, color, tex, inst)

    def polygon(self, pts, cls, color, tex=DEFAULT_TEXTURE, inst=0):
        self.polygons([pts], cls, color, tex, inst)

    def rect(self, x0, y0, x1, y1, cls, color, tex=DEFAULT_TEXTURE, inst=0):
        self.polygons([[(x0, y0), (x1, y0), (x1, y1), (x0, y1)]], cls, color, tex, inst)

    def ellipse(self, cx, cy, ax, ay, cls, color, tex=DEFAULT_TEXTURE, inst=0, thickness=-1):
        c, axes = (_fixed(cx), _fixed(cy)), (max(_fixed(ax), 1), max(_fixed(ay), 1))
        self._draw(lambda buf, v: cv2.ellipse(buf, c, axes, 0, 0, 360, v, thickness, cv2.LINE_8, _SHIFT),
                   cls, color, tex, inst)

    def line(self, p0, p1, width, cls, color, tex=DEFAULT_TEXTURE, inst=0):
        a, b, w = (_fixed(p0[0]), _fixed(p0[1])), (_fixed(p1[0]), _fixed(p1[1])), max(int(round(width)), 1)
        self._draw(lambda buf, v: cv2.line(buf, a, b, v, w, cv2.LINE_8, _SHIFT), cls, color, tex, inst)

    # ---- masks (``rows``: the mask covers only these rows of the image)
    def fill(self, mask, cls, color, tex=DEFAULT_TEXTURE, inst=0, rows=slice(None)):
        """Paint a boolean mask with one RGB colour; ``cls=None`` keeps labels (changes colour and texture)."""
        for plane, c in zip(self.planes, color):
            plane[rows][mask] = c
        meta = self.meta[rows]
        if cls is None:
            meta[mask] = (meta[mask] & ~0xFF00) | (self.profile(tex) << 8)
        else:
            meta[mask] = self.packed(cls, tex, inst)

    def scale_colors(self, mask, factor, rows=slice(None)):
        """Darken (factor < 1) or brighten the colours under a boolean mask; labels unchanged."""
        for plane in self.planes:
            plane[rows][mask] *= np.float32(factor)

    def shade_ellipse(self, cx, cy, ax, ay, factor):
        """Scale colours inside an ellipse (soft shadows under vehicles); labels unchanged."""
        r = max(ax, ay) + 2
        ya, yb = max(int(cy - r), 0), min(int(cy + r) + 2, self.h)
        xa, xb = max(int(cx - r), 0), min(int(cx + r) + 2, self.w)
        if ya >= yb or xa >= xb:
            return
        sub = np.zeros((yb - ya, xb - xa), np.uint8)
        cv2.ellipse(sub, (_fixed(cx - xa), _fixed(cy - ya)), (max(_fixed(ax), 1), max(_fixed(ay), 1)), 0, 0, 360,
                    1, -1, cv2.LINE_8, _SHIFT)
        m = sub.view(bool)
        for plane in self.planes:
            plane[ya:yb, xa:xb][m] *= np.float32(factor)

    def texture_shade(self):
        """Per-pixel multiplicative texture (H x W) from each pixel's texture profile."""
        coef = np.zeros((3, 256), np.float32)
        for key, idx in self._profiles.items():
            coef[:, idx] = key
        prof = self.prof
        shade = 1.0 + coef[0][prof] * self.tex[0]
        shade += coef[1][prof] * self.tex[1]
        shade += coef[2][prof] * self.tex[2]
        return shade


class Street:
    """Ground geometry of one scene: horizon, vanishing point, road bend and widths (world units)."""

    def __init__(self, rng, style, h, w):
        self.h, self.w = h, w
        self.yh = float(rng.uniform(*style.horizon) * h)
        self.span = h - self.yh  # pixels per world unit at t = 1
        self.vx = float(w / 2 + rng.uniform(-0.12, 0.12) * w)
        self.offset = float(rng.uniform(-0.5, 0.5))  # road centre relative to the camera
        self.bend = float(rng.uniform(-0.3, 0.3) * w)
        self.R = float(rng.uniform(*style.road_half_width))
        self.sw = [
            float(rng.uniform(*style.sidewalk_width)) if rng.random() < style.sidewalk_prob else 0.0
            for _ in range(2)
        ]  # left, right
        self.setback = [float(rng.uniform(*style.wall_setback)) for _ in range(2)]

    def scale(self, t):
        return t * self.span

    def center(self, t):
        tb = np.minimum(t, 1.0)  # the bend lives between the horizon and the bottom row; straight beyond
        return self.vx + self.offset * self.scale(t) + self.bend * tb * (1.0 - tb)

    def x_at(self, t, s):
        """Image column of lateral world position ``s`` at depth ``t``."""
        return self.center(t) + s * self.scale(t)

    def y_at(self, t):
        return self.yh + self.scale(t)

    def ground_coords(self):
        """The rows below the horizon (a slice) and, for them: depth t and z = 1/t per row (n x 1), lateral
        world position s per pixel (n x W)."""
        r0 = min(int(np.floor(self.yh)) + 1, self.h)
        yy, xx = grid(self.h, self.w)
        t = (yy[r0:, :1] - self.yh) / self.span
        s = (xx[r0:] - self.center(t)) / self.scale(t)
        return slice(r0, self.h), t, s, 1.0 / t

"""Multi-scale deformable attention (Deformable DETR), in pure PyTorch, or the reference's compiled op.

``ms_deform_attn`` is the sampling kernel, a pure function of tensors. It dispatches:

- on a device where the reference's compiled extension (the ``MultiScaleDeformableAttention`` module that
  Mask2Former's ``ops/make.sh`` builds) is importable and supports the device (CUDA), to that op;
- otherwise without gradients to one weighted gather, with gradients to ``grid_sample`` per level, whose
  intermediate tensors autograd keeps (about 6.7x the op's inputs), or, with ``recompute=True``, to the
  same computation under activation checkpointing: only value, locations and weights are kept, and the
  sampling is recomputed in backward (the compiled op keeps only its inputs too).

``MSDeformAttn`` is the module around it, with the reference's parameter names and initialisation, so
reference checkpoints load unchanged.
"""
import importlib
import math
import warnings

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

__all__ = [
    "MSDeformAttn",
    "ms_deform_attn",
    "ms_deform_attn_gather",
    "ms_deform_attn_grid_sample",
    "deform_sampling_locations",
    "compiled_op",
    "COMPILED_OP_DEVICES",
]

# The reference's compiled extension: its module name and the devices it has kernels for.
COMPILED_OP_MODULE = "MultiScaleDeformableAttention"
COMPILED_OP_DEVICES = ("cuda",)
# Images per CUDA block of the compiled op (the reference's MSDeformAttn passes 128).
IM2COL_STEP = 128
_compiled_op_cache = {}


def compiled_op(device_type):
    """The compiled extension module for ``device_type`` ("cuda"), or None when it is not installed or has no
    kernels there. The import is tried once per process."""
    if device_type not in COMPILED_OP_DEVICES:
        return None
    if COMPILED_OP_MODULE not in _compiled_op_cache:
        try:
            _compiled_op_cache[COMPILED_OP_MODULE] = importlib.import_module(COMPILED_OP_MODULE)
        except ImportError:
            _compiled_op_cache[COMPILED_OP_MODULE] = None
    return _compiled_op_cache[COMPILED_OP_MODULE]


class _CompiledMSDeformAttn(torch.autograd.Function):
    """The compiled op's forward and backward (float32 in, float32 out, as the reference calls them)."""

    @staticmethod
    def forward(ctx, op, value, shapes, starts, sampling_locations, attention_weights):
        ctx.op = op
        ctx.save_for_backward(value, shapes, starts, sampling_locations, attention_weights)
        return op.ms_deform_attn_forward(value, shapes, starts, sampling_locations, attention_weights, IM2COL_STEP)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        value, shapes, starts, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = ctx.op.ms_deform_attn_backward(
            value, shapes, starts, sampling_locations, attention_weights, grad_output.contiguous(), IM2COL_STEP)
        return None, grad_value, None, None, grad_locations, grad_weights


def ms_deform_attn_compiled(op, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """:func:`ms_deform_attn` through the compiled op ``op`` (see :func:`compiled_op`). The level shapes and
    start indices become int64 tensors on the device, written there without a copy from the host."""
    shapes, starts = _int_pairs(spatial_shapes), _ints(level_start_index)
    shapes_t = _level_table([list(hw) for hw in shapes], torch.int64, value.device)
    starts_t = _level_table([[s] for s in starts], torch.int64, value.device).view(-1)
    return _CompiledMSDeformAttn.apply(op, value.float().contiguous(), shapes_t, starts_t,
                                       sampling_locations.float().contiguous(), attention_weights.float().contiguous())


def _coordinates(t):
    """``t`` in at least float32: pixel coordinates in float16 are off by up to 1/32 px at 64 px."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# The level shapes and start indices are wanted as Python ints. Tensors are accepted too, for the
# reference's interface, but reading them is a host sync on an accelerator: the model passes ints.
def _int_pairs(spatial_shapes):
    if torch.is_tensor(spatial_shapes):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def _ints(index):
    return [int(i) for i in (index.tolist() if torch.is_tensor(index) else index)]


def _level_table(rows, dtype, device):
    """[L, k] tensor of per-level Python numbers (``rows``: L lists of k), written on ``device`` by fill
    kernels. ``torch.tensor(rows, device=...)`` would copy them from pageable host memory, which on CUDA
    waits for all queued work (a host sync) in every layer."""
    table = torch.empty((len(rows), len(rows[0])), dtype=dtype, device=device)
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            table[i, j].fill_(v)
    return table


def _sizes_xy(shapes, like):
    """[L, 2] (W_l, H_l) in ``like``'s dtype, on its device."""
    return _level_table([[w, h] for h, w in shapes], like.dtype, like.device)


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, recompute=False):
    """Attention-weighted sum of values sampled bilinearly at free locations on several feature maps.

    value:               [N, S, M, D]  M heads of D channels at the S = sum(H_l * W_l) pixels of all
                                       levels, each level flattened row-major, level l from
                                       level_start_index[l].
    spatial_shapes:      [L, 2]        (H_l, W_l) per level: pairs of ints (or a tensor, read on the host).
    level_start_index:   [L]           ints (or a tensor, read on the host).
    sampling_locations:  [N, Lq, M, L, P, 2]  (x, y) in map-relative units: 0 and 1 are the outer
                                       edges of the first and last pixels (grid_sample with
                                       align_corners=False); outside the map values are zero.
    attention_weights:   [N, Lq, M, L, P]
    Returns [N, Lq, M * D].

    Where the compiled op is installed for the tensors' device, it runs there. Otherwise, without gradients
    (inference, frozen teachers), as one weighted gather (:func:`ms_deform_attn_gather`); with them through
    ``grid_sample`` (:func:`ms_deform_attn_grid_sample`), whose backward is faster than the gather's, and with
    ``recompute`` under activation checkpointing (autograd keeps the three inputs only). All give the same
    values and gradients.
    """
    shapes, starts = _int_pairs(spatial_shapes), _ints(level_start_index)
    num_levels = sampling_locations.shape[3]
    if len(shapes) != num_levels:
        raise ValueError(f"ms_deform_attn: {len(shapes)} spatial shapes for {num_levels} sampled levels")
    op = compiled_op(value.device.type)
    if op is not None:
        return ms_deform_attn_compiled(op, value, shapes, starts, sampling_locations, attention_weights)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (value, sampling_locations, attention_weights)):
        if recompute:
            return torch.utils.checkpoint.checkpoint(
                ms_deform_attn_grid_sample, value, shapes, starts, sampling_locations, attention_weights,
                use_reentrant=False, preserve_rng_state=False)
        return ms_deform_attn_grid_sample(value, shapes, starts, sampling_locations, attention_weights)
    return ms_deform_attn_gather(value, shapes, starts, sampling_locations, attention_weights)


def ms_deform_attn_grid_sample(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """:func:`ms_deform_attn` with one ``grid_sample`` per level."""
    n, _, m, d = value.shape
    _, lq, _, num_levels, p, _ = sampling_locations.shape
    shapes, starts = _int_pairs(spatial_shapes), _ints(level_start_index)
    # Heads go into the batch dimension and the queries last: grids [N * M, L, P, Lq, 2] in grid_sample's
    # [-1, 1], so each level samples [N * M, D, P, Lq]. With the queries (thousands) innermost, the
    # weighting below is a vectorised multiply and a sum over rows; with the points (4) innermost, as
    # the locations come, a model-sized layer's forward + backward took 0.77 s instead of 0.58 (1 thread).
    grids = (2 * sampling_locations - 1).permute(0, 2, 3, 4, 1, 5).flatten(0, 1).contiguous()
    weights = attention_weights.permute(0, 2, 3, 4, 1).flatten(0, 1).unsqueeze(1).contiguous()  # [N * M, 1, L, P, Lq]
    out = None
    for lvl, ((h, w), start) in enumerate(zip(shapes, starts)):
        v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        sampled = F.grid_sample(v, grids[:, lvl], mode="bilinear", padding_mode="zeros", align_corners=False)
        term = (sampled * weights[:, :, lvl]).sum(2)  # [N * M, D, Lq]
        out = term if out is None else out + term
    return out.view(n, m * d, lq).transpose(1, 2)


def _zero_bordered_rows(value, shapes, starts):
    """value [N, S, M, D] -> [N * S' * M, D]: every level with a zero border, 1 pixel wide at the
    top / left and 2 at the bottom / right, one row per (image, pixel, head)."""
    n, _, m, d = value.shape
    levels = [F.pad(value[:, start:start + h * w].reshape(n, h, w, m * d), (0, 0, 1, 2, 1, 2)).flatten(1, 2)
              for (h, w), start in zip(shapes, starts)]
    return torch.cat(levels, 1).view(-1, d)


def ms_deform_attn_gather(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """:func:`ms_deform_attn` as a single ``embedding_bag``: every output row is the sum of its 4 * L * P
    corner rows times (attention weight x bilinear weight). On the CPU about 3x faster forward than the
    grid_sample version, but its backward is slower, so :func:`ms_deform_attn` uses it without gradients."""
    shapes = _int_pairs(spatial_shapes)
    locations = _coordinates(sampling_locations)
    pixels = locations * _sizes_xy(shapes, locations)[:, None, :] - 0.5
    return _gather_at_pixels(value, shapes, _ints(level_start_index), pixels, attention_weights)


def _gather_at_pixels(value, shapes, starts, pixels, attention_weights):
    """:func:`ms_deform_attn_gather` with the locations as pixel coordinates [N, Lq, M, L, P, 2] of each
    level (pixel centres at integers: location * size - 0.5)."""
    n, _, m, d = value.shape
    _, lq, _, num_levels, p, _ = pixels.shape
    table = _zero_bordered_rows(value, shapes, starts)
    padded = [(h + 3) * (w + 3) for h, w in shapes]
    padded_starts = [sum(padded[:i]) for i in range(num_levels)]

    # The per-level constants below are expanded to [L, P, 2] so that broadcasting happens over the
    # leading dimensions only (an innermost broadcast dimension of 2 is several times slower).
    # Clamped to [-1, size]: beyond, all four corners lie in the zero border either way.
    size_xy = _sizes_xy(shapes, pixels)[:, None, :].expand(num_levels, p, 2).contiguous()
    pixels = torch.minimum(pixels.clamp(min=-1.0), size_xy)
    low = pixels.floor()
    frac = pixels - low
    # Table row of the top-left corner, ((b * S' + start'_l + (y0 + 1) * (W_l + 3) + x0 + 1) * M + head,
    # summed in floats that hold every row index exactly (float32 below 2**24 rows, else float64, never
    # the half precision an autocast model may give), then int32 indices for half the memory traffic.
    num_rows = table.shape[0]
    index_float = torch.float32 if num_rows < 2 ** 24 else torch.float64
    index_int = torch.int32 if num_rows < 2 ** 31 else torch.int64
    # Per level: the row steps one pixel right / down, and the row of pixel (0, 0) of image 0, head 0.
    level = _level_table([[m, (w + 3) * m, (s + w + 4) * m] for s, (_, w) in zip(padded_starts, shapes)],
                         index_float, pixels.device)
    step_xy = level[:, None, :2].expand(num_levels, p, 2).contiguous()
    base = (torch.arange(n, dtype=index_float, device=pixels.device)[:, None, None] * (sum(padded) * m)
            + torch.arange(m, dtype=index_float, device=pixels.device)[:, None] + level[:, 2])
    top_left = torch.add((low.to(index_float) * step_xy).sum(-1), base[:, None, :, :, None])
    top_left = top_left.to(index_int)  # [N, Lq, M, L, P]
    # The four corners' rows from the top-left's: + 0, + right, + down, + right + down.
    corner_step = torch.cat((level.new_zeros(num_levels, 1), level[:, :2], level[:, :2].sum(1, keepdim=True)), 1)
    rows = top_left[..., None] + corner_step.to(index_int)[:, None, :]  # [N, Lq, M, L, P, 4]
    # Corner weights (y0 x0, y0 x1, y1 x0, y1 x1) times the attention weight.
    fx, fy = frac.unbind(-1)
    wy1 = fy * attention_weights
    wy = torch.stack((attention_weights - wy1, wy1), -1)
    wx = torch.stack((1 - fx, fx), -1)
    weights = wy[..., :, None] * wx[..., None, :]  # [N, Lq, M, L, P, 2, 2]
    k = num_levels * p * 4
    out = F.embedding_bag(rows.view(-1, k), table, per_sample_weights=weights.view(-1, k).to(table.dtype), mode="sum")
    return out.view(n, lq, m * d)


def deform_sampling_locations(reference_points, sampling_offsets, spatial_shapes, n_points):
    """Sampling locations [N, Lq, M, L, P, 2] from reference points and predicted offsets.

    reference_points [N, Lq, L, 2]: (x, y) in [0, 1]; offsets [N, Lq, M, L, P, 2] are in pixels of
    each level. Or reference boxes [N, Lq, L, 4] (cx, cy, w, h): offsets are then fractions of half
    the box size, scaled down by the number of points.
    """
    if reference_points.shape[-1] == 2:
        normalizer = _sizes_xy(_int_pairs(spatial_shapes), sampling_offsets)  # [L, 2] (W, H)
        return reference_points[:, :, None, :, None, :] + sampling_offsets / normalizer[None, None, None, :, None, :]
    if reference_points.shape[-1] == 4:
        return (reference_points[:, :, None, :, None, :2]
                + sampling_offsets / n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
    raise ValueError(f"reference_points must end in 2 (points) or 4 (boxes), not {reference_points.shape[-1]}")


class MSDeformAttn(nn.Module):
    """Each query attends to ``n_points`` locations per head and level, placed around its reference
    point by offsets predicted from the query, with softmax weights also predicted from the query."""

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, recompute=False):
        """``recompute``: keep only the sampling's inputs for backward (see :func:`ms_deform_attn`)."""
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model {d_model} is not divisible by n_heads {n_heads}")
        head_dim = d_model // n_heads
        if head_dim & (head_dim - 1):
            warnings.warn(f"MSDeformAttn: a power-of-2 head dimension (now {head_dim}) is faster in CUDA kernels")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.recompute = recompute
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        # Offsets start as a fixed pattern: head k looks along direction 2*pi*k/M (scaled to the unit
        # square's border), point i at distance i + 1; attention starts uniform.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        grid = directions[:, None, None, :] * steps[None, None, :, None]
        grid = grid.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):
        """query [N, Lq, C]; reference_points [N, Lq, L, 2 or 4]; input_flatten [N, S, C];
        input_padding_mask [N, S] (True on padding) or None. Returns [N, Lq, C]."""
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        logits = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        # requires_grad of the tensors computed above already says whether autograd is on and reaches them.
        needs_grad = any(t.requires_grad for t in (value, offsets, logits, reference_points))
        if needs_grad or compiled_op(value.device.type) is not None:
            weights = logits.softmax(-1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
            locations = deform_sampling_locations(reference_points, offsets, input_spatial_shapes, self.n_points)
            out = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights,
                                 recompute=self.recompute)
        else:
            out = self._sample_without_grad(value, offsets, logits, reference_points, input_spatial_shapes,
                                            input_level_start_index)
        return self.output_proj(out)

    def _sample_without_grad(self, value, offsets, logits, reference_points, spatial_shapes, level_start_index):
        """The gather path with fewer passes over the [N, Lq, M, L, P] tensors: a softmax written out (torch's
        is several times slower over a last dimension this short) and, for point references, the pixel
        coordinates as reference x size + offset - 0.5 instead of going through map-relative locations."""
        n, lq, m = logits.shape[:3]
        weights = (logits - logits.amax(-1, keepdim=True)).exp_()
        weights = weights.div_(weights.sum(-1, keepdim=True)).view(n, lq, m, self.n_levels, self.n_points)
        shapes = _int_pairs(spatial_shapes)
        if reference_points.shape[-1] != 2:
            locations = deform_sampling_locations(reference_points, offsets, spatial_shapes, self.n_points)
            return ms_deform_attn(value, shapes, level_start_index, locations, weights)
        reference_points, offsets = _coordinates(reference_points), _coordinates(offsets)
        pixels = offsets + (reference_points * _sizes_xy(shapes, reference_points) - 0.5)[:, :, None, :, None, :]
        return _gather_at_pixels(value, shapes, _ints(level_start_index), pixels, weights)

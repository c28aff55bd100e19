import math

import torch

import pytest

from selftrain_d2.modeling.pixel_decoder.ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn,
    ms_deform_attn_gather,
    ms_deform_attn_grid_sample,
)

IMPLEMENTATIONS = [ms_deform_attn, ms_deform_attn_gather, ms_deform_attn_grid_sample]
# (the recomputing path is defined below as _recomputed)
GRADIENT_IMPLEMENTATIONS = IMPLEMENTATIONS + [lambda *args: _recomputed(*args)]


def naive_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """One point at a time: bilinear interpolation at pixel coordinates (x * W - 0.5, y * H - 0.5), zero
    outside the map."""
    n, _, m, d = value.shape
    _, lq, _, num_levels, p, _ = sampling_locations.shape
    rows = []
    for b in range(n):
        for q in range(lq):
            heads = []
            for h in range(m):
                acc = value.new_zeros(d)
                for lvl in range(num_levels):
                    height, width = (int(s) for s in spatial_shapes[lvl])
                    start = int(level_start_index[lvl])
                    for k in range(p):
                        x = sampling_locations[b, q, h, lvl, k, 0] * width - 0.5
                        y = sampling_locations[b, q, h, lvl, k, 1] * height - 0.5
                        x0, y0 = math.floor(x.item()), math.floor(y.item())
                        sample = value.new_zeros(d)
                        for yi, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
                            for xi, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
                                if 0 <= yi < height and 0 <= xi < width:
                                    sample = sample + wy * wx * value[b, start + yi * width + xi, h]
                        acc = acc + attention_weights[b, q, h, lvl, k] * sample
                heads.append(acc)
            rows.append(torch.cat(heads))
    return torch.stack(rows).view(n, lq, m * d)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[4, 5], [2, 3]])
    starts = torch.tensor([0, 20])
    n, lq, m, d, p = 2, 3, 2, 3, 2
    value = torch.randn(n, 26, m, d, generator=g, dtype=torch.float64)
    # Some locations fall outside [0, 1], to exercise the zero padding.
    locations = torch.rand(n, lq, m, 2, p, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(n, lq, m, 2, p, generator=g, dtype=torch.float64)
    return value, shapes, starts, locations, weights


@pytest.mark.parametrize("fn", IMPLEMENTATIONS)
def test_ms_deform_attn_matches_a_naive_bilinear_loop(fn):
    value, shapes, starts, locations, weights = _inputs()
    assert ((locations < 0) | (locations > 1)).any()
    fast = fn(value, shapes, starts, locations, weights)
    naive = naive_ms_deform_attn(value, shapes, starts, locations, weights)
    assert fast.shape == (2, 3, 6)
    torch.testing.assert_close(fast, naive, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", GRADIENT_IMPLEMENTATIONS)
def test_ms_deform_attn_gradients_match_the_naive_loop(impl):
    inputs = _inputs(seed=1)
    value, shapes, starts, locations, weights = inputs
    grad_out = torch.randn(2, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (impl, naive_ms_deform_attn):
        leaves = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
        out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
        grads.append(torch.autograd.grad(out, leaves, grad_out))
    for fast, naive, name in zip(*grads, ("value", "sampling_locations", "attention_weights")):
        torch.testing.assert_close(fast, naive, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad w.r.t. {name}: {m}")


def test_gather_matches_grid_sample_far_outside_and_on_pixel_edges():
    """Locations far outside the maps (all corners zero), exactly on the borders and on pixel centres."""
    value, shapes, starts, _, weights = _inputs(seed=3)
    g = torch.Generator().manual_seed(4)
    locations = torch.rand(2, 3, 2, 2, 2, 2, generator=g, dtype=torch.float64) * 6 - 3
    locations[0, 0] = 0.0
    locations[0, 1] = 1.0
    locations[1, 0, :, 0, :, 0] = (torch.arange(2, dtype=torch.float64) + 0.5) / 5  # centres of level 0's columns
    assert (locations.abs() > 2).any()
    naive = naive_ms_deform_attn(value, shapes, starts, locations, weights)
    torch.testing.assert_close(ms_deform_attn_gather(value, shapes, starts, locations, weights), naive,
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ms_deform_attn_grid_sample(value, shapes, starts, locations, weights), naive,
                               rtol=1e-10, atol=1e-10)


def test_ms_deform_attn_uses_the_gather_only_without_gradients(monkeypatch):
    import importlib

    # (the package re-exports the function under the module's name, so import the module itself)
    module = importlib.import_module("selftrain_d2.modeling.pixel_decoder.ms_deform_attn")
    calls = []
    for name in ("ms_deform_attn_gather", "ms_deform_attn_grid_sample"):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    value, shapes, starts, locations, weights = _inputs()
    with torch.no_grad():
        module.ms_deform_attn(value.requires_grad_(True), shapes, starts, locations, weights)
    module.ms_deform_attn(value.detach(), shapes, starts, locations, weights)
    module.ms_deform_attn(value.requires_grad_(True), shapes, starts, locations, weights)
    assert calls == ["ms_deform_attn_gather", "ms_deform_attn_gather", "ms_deform_attn_grid_sample"]


def test_gather_float32_matches_grid_sample_at_model_size():
    g = torch.Generator().manual_seed(5)
    shapes, starts = torch.tensor([[3, 4], [6, 8], [12, 16]]), torch.tensor([0, 12, 60])
    value = torch.randn(2, 252, 4, 8, generator=g)
    locations = torch.rand(2, 252, 4, 3, 4, 2, generator=g) * 1.2 - 0.1
    weights = torch.rand(2, 252, 4, 3, 4, generator=g).softmax(-1)
    torch.testing.assert_close(ms_deform_attn_gather(value, shapes, starts, locations, weights),
                               ms_deform_attn_grid_sample(value, shapes, starts, locations, weights),
                               rtol=1e-5, atol=1e-5)


def test_ms_deform_attn_accepts_python_shapes():
    value, shapes, starts, locations, weights = _inputs()
    torch.testing.assert_close(ms_deform_attn(value, shapes.tolist(), starts.tolist(), locations, weights),
                               ms_deform_attn(value, shapes, starts, locations, weights))


def test_msdeformattn_initial_offsets_and_uniform_attention():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    grid = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 0 looks right, head 1 down (x, y); point i at distance i + 1; the same on every level
    torch.testing.assert_close(grid[0, 1, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(grid[1, 0, 2], torch.tensor([0.0, 3.0]), atol=1e-6, rtol=0)
    assert torch.equal(attn.sampling_offsets.weight, torch.zeros_like(attn.sampling_offsets.weight))
    assert torch.equal(attn.attention_weights.bias, torch.zeros(4 * 2 * 3))

    shapes = torch.tensor([[4, 4], [2, 2]])
    starts = torch.tensor([0, 16])
    src = torch.randn(2, 20, 16)
    ref = torch.rand(2, 20, 2, 2)
    out = attn(src, ref, src, shapes, starts)
    assert out.shape == (2, 20, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_msdeformattn_without_gradients_equals_the_gradient_path(ref_dim):
    # Without gradients the module computes pixel coordinates and the softmax its own way (fewer passes);
    # the values must be those of the differentiable path.
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3).double()
    with torch.no_grad():  # offsets that reach outside the maps and uneven attention
        attn.sampling_offsets.weight.normal_(0, 2.0)
        attn.attention_weights.weight.normal_(0, 1.0)
    shapes = torch.tensor([[6, 5], [3, 4]])
    starts = torch.tensor([0, 30])
    x = torch.randn(2, 42, 32, dtype=torch.float64)
    query = torch.randn(2, 7, 32, dtype=torch.float64)
    ref = torch.rand(2, 7, 2, ref_dim, dtype=torch.float64)
    with_grad = attn(query, ref, x, shapes, starts)
    with torch.no_grad():
        without = attn(query, ref, x, shapes, starts)
    assert with_grad.requires_grad and not without.requires_grad
    torch.testing.assert_close(without, with_grad, rtol=1e-10, atol=1e-10)


def test_gather_indices_survive_half_precision_locations():
    # An autocast model gives float16 offsets: the gather's row indices and pixel coordinates must not be
    # computed in float16 (indices are exact only up to 2048), so a large map samples the right pixels.
    torch.manual_seed(0)
    shapes = [(64, 80)]
    value = torch.randn(1, 64 * 80, 2, 4)
    locations = torch.rand(1, 50, 2, 1, 3, 2).half()
    weights = torch.rand(1, 50, 2, 1, 3).half()
    expected = ms_deform_attn_gather(value, shapes, [0], locations.float(), weights.float())
    half = ms_deform_attn_gather(value, shapes, [0], locations, weights)
    # Only the float16 attention weights differ now; a wrong row would be off by a whole value (~1).
    torch.testing.assert_close(half.float(), expected, rtol=0.01, atol=0.01)


def _recomputed(*args):
    return ms_deform_attn(*args, recompute=True)


def _saved_storages(fn, *args):
    """The distinct storages autograd keeps for backward while ``fn(*args)`` runs."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return saved


def test_recomputed_sampling_has_the_same_gradients_and_keeps_only_its_inputs():
    value, shapes, starts, locations, weights = _inputs(seed=5)
    grad_out = torch.randn(2, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    grads = []
    for fn in (ms_deform_attn_grid_sample, _recomputed):
        leaves = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
        out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
        grads.append(torch.autograd.grad(out, leaves, grad_out))
    for a, b in zip(*grads):
        assert torch.equal(a, b)  # the same operations, run again in backward
    leaves = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
    args = (leaves[0], shapes, starts, leaves[1], leaves[2])
    kept = _saved_storages(_recomputed, *args)
    assert set(kept) == {t.untyped_storage().data_ptr() for t in leaves}
    assert sum(_saved_storages(ms_deform_attn_grid_sample, *args).values()) > sum(kept.values())


class _StandInOp:
    """What the reference's compiled module offers, computed here with the PyTorch path; records its calls."""

    def __init__(self):
        self.calls = []

    def ms_deform_attn_forward(self, value, shapes, starts, locations, weights, im2col_step):
        assert shapes.dtype == starts.dtype == torch.int64 and shapes.device == value.device
        self.calls.append("forward")
        return ms_deform_attn_grid_sample(value, shapes.tolist(), starts.tolist(), locations, weights)

    def ms_deform_attn_backward(self, value, shapes, starts, locations, weights, grad_output, im2col_step):
        self.calls.append("backward")
        leaves = [t.detach().requires_grad_(True) for t in (value, locations, weights)]
        with torch.enable_grad():
            out = ms_deform_attn_grid_sample(leaves[0], shapes.tolist(), starts.tolist(), leaves[1], leaves[2])
        return torch.autograd.grad(out, leaves, grad_output)


def test_compiled_op_is_used_where_installed_for_the_device(monkeypatch):
    import importlib
    import sys

    module = importlib.import_module("selftrain_d2.modeling.pixel_decoder.ms_deform_attn")
    op = _StandInOp()
    monkeypatch.setitem(sys.modules, module.COMPILED_OP_MODULE, op)
    monkeypatch.setattr(module, "_compiled_op_cache", {})
    assert module.compiled_op("cuda") is op and module.compiled_op("cpu") is None

    # The same dispatch on CPU tensors, with the stand-in declared a CPU op.
    monkeypatch.setattr(module, "COMPILED_OP_DEVICES", ("cpu",))
    value, shapes, starts, locations, weights = _inputs(seed=7)
    value, locations, weights = (t.float() for t in (value, locations, weights))
    leaves = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
    out = module.ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
    out.square().sum().backward()
    assert op.calls == ["forward", "backward"]
    reference = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
    expected = ms_deform_attn_grid_sample(reference[0], shapes, starts, reference[1], reference[2])
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for a, b in zip(leaves, reference):
        torch.testing.assert_close(a.grad, b.grad)
    # The module takes the op also without gradients (its own gather is for the PyTorch path only).
    attn = module.MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2)
    with torch.no_grad():
        attn(torch.randn(1, 26, 8), torch.rand(1, 26, 2, 2), torch.randn(1, 26, 8), [(4, 5), (2, 3)], [0, 20])
    assert op.calls[-1] == "forward" and len(op.calls) == 3


def test_a_missing_compiled_op_falls_back_to_pytorch(monkeypatch):
    import importlib
    import sys

    module = importlib.import_module("selftrain_d2.modeling.pixel_decoder.ms_deform_attn")
    monkeypatch.setitem(sys.modules, module.COMPILED_OP_MODULE, None)  # import fails
    monkeypatch.setattr(module, "_compiled_op_cache", {})
    assert module.compiled_op("cuda") is None

"""Test-time augmentation for dense class probabilities (pure functions).

``predict(image [3, h, w]) -> probs [C, h, w]`` is any callable returning per-pixel class probabilities at the
size of its input; these helpers call it on rescaled, flipped or cropped images and average the results.
"""
import torch
import torch.nn.functional as F

__all__ = ["resize_map", "window_starts", "sliding_window", "multi_scale_flip"]


def resize_map(x, size):
    """``x`` ``[C, H, W]`` resized bilinearly to ``size`` (h, w) as float; unchanged when already that size."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def window_starts(length, window, stride):
    """Start offsets of windows of ``window`` pixels every ``stride`` along ``length``; the last one ends at
    the border, so every pixel is covered. One window at 0 when ``length <= window``."""
    if window < 1 or stride < 1:
        raise ValueError(f"sliding window size and stride must be >= 1, got size {window} and stride {stride}")
    if stride > window:
        raise ValueError(f"sliding-window stride {stride} exceeds the window size {window}: pixels would be missed")
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def sliding_window(predict, image, window, stride, pad_value=0.0):
    """Probabilities ``[C, H, W]`` of ``image`` ``[3, H, W]`` predicted window by window.

    ``window`` and ``stride`` are (height, width). Every window the model sees has exactly the window's size
    (some models, e.g. DeepLab's ASPP with a fixed pooling kernel, accept no other): an image smaller than the
    window is padded at the bottom / right with ``pad_value`` (a scalar or one value per channel) and the
    padding cut from the prediction. Where windows overlap, their probabilities are averaged.
    """
    height, width = image.shape[-2:]
    wh, ww = int(window[0]), int(window[1])
    if height < wh or width < ww:
        fill = torch.as_tensor(pad_value, dtype=torch.float32).reshape(-1, 1, 1)
        padded = fill.expand(image.shape[0], max(height, wh), max(width, ww)).clone()
        padded[:, :height, :width] = image
        return sliding_window(predict, padded, window, stride)[:, :height, :width]
    total, count = None, None
    for y in window_starts(height, wh, int(stride[0])):
        for x in window_starts(width, ww, int(stride[1])):
            p = predict(image[..., y : y + wh, x : x + ww]).float()
            if total is None:
                total = p.new_zeros((p.shape[0], height, width))
                count = p.new_zeros((1, height, width))
            total[:, y : y + wh, x : x + ww] += p
            count[:, y : y + wh, x : x + ww] += 1
    return total / count


def multi_scale_flip(predict, image, scales=(1.0,), flip=False, out_size=None):
    """Mean of the probabilities predicted for ``image`` ``[3, H, W]`` at each scale (bilinear resize to
    ``round(H * s) x round(W * s)``), and for its horizontal mirror image when ``flip`` (mirrored back).

    Each prediction is resized to ``out_size`` (default: the image's size) before averaging.
    """
    if not scales:
        raise ValueError("test-time augmentation needs at least one scale")
    height, width = image.shape[-2:]
    out_size = tuple(out_size) if out_size is not None else (height, width)
    total, n = None, 0
    for s in scales:
        if s <= 0:
            raise ValueError(f"test-time augmentation scales must be positive, got {s}")
        size = (max(1, round(height * s)), max(1, round(width * s)))
        scaled = resize_map(image, size)
        for mirrored in (False, True) if flip else (False,):
            p = predict(scaled.flip(-1) if mirrored else scaled)
            if mirrored:
                p = p.flip(-1)
            p = resize_map(p.float(), out_size)
            total = p if total is None else total + p
            n += 1
    return total / n

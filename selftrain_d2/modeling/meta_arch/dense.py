"""What every per-pixel classifier (Fast-SCNN, PSPNet ...) does around its network, as Detectron2's
SemanticSegmentor does: normalise and pad the batch, pad the label maps with ignore, and return class
scores at each image's original size."""
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

__all__ = ["normalized_images", "padded_targets", "sem_seg_results"]


def normalized_images(batched_inputs, pixel_mean, pixel_std, size_divisibility):
    images = [(x["image"].to(pixel_mean.device) - pixel_mean) / pixel_std for x in batched_inputs]
    return ImageList.from_tensors(images, size_divisibility)


def padded_targets(batched_inputs, size_divisibility, ignore_value, model_name, device):
    """``N x H x W`` long label maps, padded like the images with ``ignore_value``."""
    if "sem_seg" not in batched_inputs[0]:
        raise ValueError(f"{model_name} in training mode needs 'sem_seg' in every input (the mapper's label map)")
    targets = [x["sem_seg"].to(device) for x in batched_inputs]
    return ImageList.from_tensors(targets, size_divisibility, pad_value=ignore_value).tensor.long()


def sem_seg_results(scores, batched_inputs, image_sizes):
    """``[{"sem_seg": C x H x W}]`` at each input's ``height`` x ``width`` (default: its size as given)."""
    results = []
    for score, x, image_size in zip(scores, batched_inputs, image_sizes):
        height = x.get("height", image_size[0])
        width = x.get("width", image_size[1])
        results.append({"sem_seg": sem_seg_postprocess(score, image_size, height, width)})
    return results

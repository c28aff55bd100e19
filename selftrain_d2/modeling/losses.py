"""Mask losses and pairwise matching costs of Mask2Former, as pure functions on point samples.

Shapes: ``inputs`` are mask logits and ``targets`` binary (or soft) masks in [0, 1], both
flattened to points: ``[R, P]`` for the losses (row r of inputs pairs with row r of targets),
``[Q, P]`` and ``[N, P]`` for the costs, which compare every prediction with every target.
"""
import torch.nn.functional as F

__all__ = [
    "sigmoid_ce_loss",
    "dice_loss",
    "batch_sigmoid_ce_cost",
    "batch_dice_cost",
    "calculate_uncertainty",
]


def sigmoid_ce_loss(inputs, targets, num_masks):
    """Binary cross-entropy averaged over the points of each mask, summed over masks, / num_masks."""
    inputs, targets = inputs.flatten(1), targets.flatten(1)
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(inputs, targets, num_masks):
    """1 - (2|p*t| + 1) / (|p| + |t| + 1) per mask with p = sigmoid(inputs), summed, / num_masks."""
    probs, targets = inputs.sigmoid().flatten(1), targets.flatten(1)
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def batch_sigmoid_ce_cost(inputs, targets):
    """[Q, N] mean binary cross-entropy of every prediction (row of inputs) against every target."""
    # BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x) = softplus(x) - t * x, so all pairs come
    # from one row sum and one matmul.
    num_points = inputs.shape[1]
    return (F.softplus(inputs).sum(1, keepdim=True) - inputs @ targets.T) / num_points


def batch_dice_cost(inputs, targets):
    """[Q, N] dice loss of every prediction against every target (same smoothing as dice_loss)."""
    probs = inputs.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def calculate_uncertainty(logits):
    """-|logit| of single-channel logits [R, 1, ...]: highest where the mask is least certain."""
    if logits.shape[1] != 1:
        raise ValueError(f"calculate_uncertainty expects single-channel logits [R, 1, ...], got shape {tuple(logits.shape)}")
    return -logits.abs()

"""Speed-ups of the Mask2Former model that must not change its values: the one-matmul BCE matching cost.

(Folding FrozenBN into the ResNet convolutions and a channels-last backbone input were tried and removed:
measured on an idle machine they made the training step slower, 5.3 s -> 7.0 s (channels-last) and the
inference slower, 0.86 s -> 1.02 s per image (folding).)"""
import torch

from selftrain_d2.modeling.losses import batch_sigmoid_ce_cost


def test_one_matmul_bce_cost_equals_the_two_matmul_form():
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(7, 50, generator=g, dtype=torch.float64) * 5
    targets = (torch.rand(3, 50, generator=g, dtype=torch.float64) > 0.5).double()
    pos, neg = torch.nn.functional.softplus(-inputs), torch.nn.functional.softplus(inputs)
    two_matmuls = (pos @ targets.T + neg @ (1 - targets).T) / 50
    torch.testing.assert_close(batch_sigmoid_ce_cost(inputs, targets), two_matmuls, rtol=1e-12, atol=1e-12)

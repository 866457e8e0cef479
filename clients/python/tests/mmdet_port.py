"""The reference: mmdetection's GHMC/GHMR (mmdet/models/losses/ghm_loss.py, with
weight_reduce_loss from mmdet/models/losses/utils.py) ported to plain PyTorch, loop and all.

It keeps mmdetection's exact float32 operations in mmdetection's order (the per-bin loop of
masks, ``tot / acc_sum[i]`` with a Python float tot, ``weights / n``, the sum divided by
``tot + eps``), because the tests demand bit-for-bit equality with it. It is deliberately
independent of ghmd.torch: no shared helper, no bucketize.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = torch.finfo(torch.float32).eps


def onehot(labels, label_weights, channels):
    targets = labels.new_full((labels.size(0), channels), 0)
    keep = torch.nonzero((labels >= 0) & (labels < channels), as_tuple=False).squeeze()
    if keep.numel() > 0:
        targets[keep, labels[keep]] = 1
    return targets, label_weights.view(-1, 1).expand(label_weights.size(0), channels)


def reduce_weighted(loss, weights, reduction, tot):
    loss = loss * weights
    if reduction == "mean":
        return loss.sum() / (tot + EPS)
    if reduction == "none":
        return loss
    raise ValueError('avg_factor can not be used with reduction="sum"')


class _Port(nn.Module):
    def __init__(self, bins, momentum, loss_weight, reduction):
        super().__init__()
        self.bins = bins
        self.momentum = momentum
        self.loss_weight = loss_weight
        self.reduction = reduction
        self.register_buffer("edges", torch.arange(bins + 1).float() / bins)
        if momentum > 0:
            self.register_buffer("acc_sum", torch.zeros(bins))
        #: The weights of the last call, for tests that compare weights directly.
        self.last_weights = None

    def weights(self, g, valid, tot, like):
        """The reference loop: one mask per bin, counted, EMA-updated, weighted."""
        edges = self.edges
        mmt = self.momentum
        weights = torch.zeros_like(like)
        n = 0
        for i in range(self.bins):
            inds = (g >= edges[i]) & (g < edges[i + 1]) & valid
            num_in_bin = inds.sum().item()
            if num_in_bin > 0:
                if mmt > 0:
                    self.acc_sum[i] = mmt * self.acc_sum[i] + (1 - mmt) * num_in_bin
                    weights[inds] = tot / self.acc_sum[i]
                else:
                    weights[inds] = tot / num_in_bin
                n += 1
        if n > 0:
            weights = weights / n
        self.last_weights = weights
        return weights


class PortGHMC(_Port):
    def __init__(self, bins=10, momentum=0, use_sigmoid=True, loss_weight=1.0, reduction="mean"):
        super().__init__(bins, momentum, loss_weight, reduction)
        self.edges[-1] += 1e-6

    def forward(self, pred, target, label_weight, reduction_override=None, **kwargs):
        reduction = reduction_override if reduction_override else self.reduction
        if pred.dim() != target.dim():
            target, label_weight = onehot(target, label_weight, pred.size(-1))
        target, label_weight = target.float(), label_weight.float()
        g = torch.abs(pred.sigmoid().detach() - target)
        valid = label_weight > 0
        tot = max(valid.float().sum().item(), 1.0)
        weights = self.weights(g, valid, tot, pred)
        loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
        return reduce_weighted(loss, weights, reduction, tot) * self.loss_weight


class PortGHMR(_Port):
    def __init__(self, mu=0.02, bins=10, momentum=0, loss_weight=1.0, reduction="mean"):
        super().__init__(bins, momentum, loss_weight, reduction)
        self.mu = mu
        self.edges[-1] = 1e3

    def forward(self, pred, target, label_weight, avg_factor=None, reduction_override=None):
        reduction = reduction_override if reduction_override else self.reduction
        mu = self.mu
        diff = pred - target
        loss = torch.sqrt(diff * diff + mu * mu) - mu
        g = torch.abs(diff / torch.sqrt(mu * mu + diff * diff)).detach()
        valid = label_weight > 0
        tot = max(label_weight.float().sum().item(), 1.0)
        weights = self.weights(g, valid, tot, g)
        return reduce_weighted(loss, weights, reduction, tot) * self.loss_weight

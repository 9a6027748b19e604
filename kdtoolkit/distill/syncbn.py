"""BatchNorm synchronised over a gloo process group, for DistributedDataParallel on CPU.

torch's SyncBatchNorm only runs on GPUs (DDP refuses it on CPU modules), yet N CPU processes must
train like one process with the N-times larger batch. This layer reduces the per-channel sum, sum
of squares and count with torch.distributed's differentiable all_reduce, so both the statistics
and their gradients are those of the global batch. The launcher and the gradient sync stay
torchrun's and DDP's.
"""

from __future__ import annotations

import torch
from torch import nn


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are over the batch of all processes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1 or self.momentum is None:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xd = x.double()  # sums in float64: E[x^2] - E[x]^2 then matches one process's two-pass statistics
        local = torch.cat([xd.sum((0, 2, 3)), (xd * xd).sum((0, 2, 3)), xd.new_tensor([x.numel() / c])])
        stats = all_reduce(local)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.mul_(1 - self.momentum).add_(mean.float(), alpha=self.momentum)
                self.running_var.mul_(1 - self.momentum).add_((var * n / (n - 1).clamp_min(1)).float(), alpha=self.momentum)
        y = (x - mean.float()[None, :, None, None]) * torch.rsqrt(var.float() + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_gloo_sync_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d (in place where possible) by GlooSyncBatchNorm with the same state."""
    if type(module) is nn.BatchNorm2d:
        new = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_gloo_sync_bn(child))
    return module

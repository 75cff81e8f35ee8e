"""Keep diffusers' bookkeeping attributes in step with the tensors after channels are removed.

torch-pruning rewrites weights and the standard attributes of torch modules (``in_channels``,
``num_channels``...), but diffusers blocks keep their own copies, and some forwards assert on them
(``Upsample2D`` / ``Downsample2D`` check ``channels``) or split heads with them (``Attention``).
"""

from __future__ import annotations

from torch import nn


def sync_diffusers_attributes(model: nn.Module) -> None:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    for module in model.modules():
        if isinstance(module, (Upsample2D, Downsample2D)):
            # (avg-pool downsampling has no conv, and no channel count of its own to sync)
            conv = getattr(module, "conv", None)
            if isinstance(conv, nn.Conv2d):
                module.channels = conv.in_channels
                module.out_channels = conv.out_channels
        elif isinstance(module, ResnetBlock2D):
            module.in_channels = module.conv1.in_channels
            module.out_channels = module.conv2.out_channels
        elif isinstance(module, Attention):
            head_dim_before = module.inner_dim // max(module.heads, 1)
            module.query_dim = module.to_q.in_features
            module.inner_dim = module.to_q.out_features
            module.inner_kv_dim = module.to_k.out_features
            module.out_dim = module.to_out[0].out_features
            # Head pruning keeps the head width and removes whole heads; width pruning with one head
            # keeps heads == 1. Either way heads = width / head width.
            if module.heads > 1 and module.inner_dim % head_dim_before == 0:
                module.heads = module.inner_dim // head_dim_before

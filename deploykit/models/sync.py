"""Keep diffusers' bookkeeping attributes in step with the tensors after channels are removed.

torch-pruning rewrites weights and the standard attributes of torch modules (``in_channels``,
``num_channels``...), but diffusers blocks keep their own copies, and some forwards assert on them
(``Upsample2D`` / ``Downsample2D`` check ``channels``) or split heads with them (``Attention``).

The head count of an ``Attention`` cannot be read off its shapes (a width of 160 is 4 heads of 40 or
8 heads of 20), so it is never guessed here: it stays what the module says unless the caller, who
knows what was pruned (the pruner, or ``architecture.json``), passes it.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn


def sync_attention(module: nn.Module, name: str = "") -> None:
    """Derive an ``Attention``'s widths, head width and softmax scale from its layers and ``heads``."""
    inner = module.to_q.out_features
    if module.heads < 1 or inner % module.heads:
        raise ValueError(f"attention {name or type(module).__name__}: width {inner} is not a multiple of "
                         f"{module.heads} heads")
    module.query_dim = module.to_q.in_features
    module.inner_dim = inner
    if isinstance(getattr(module, "to_k", None), nn.Linear):
        module.inner_kv_dim = module.to_k.out_features
        if not module.is_cross_attention:
            module.cross_attention_dim = module.to_k.in_features
    module.out_dim = module.to_out[0].out_features
    module.sliceable_head_dim = module.heads
    if getattr(module, "scale_qk", True):
        # what the classic processors use; the SDPA processor derives the same from the tensors
        module.scale = (inner // module.heads) ** -0.5


def sync_diffusers_attributes(model: nn.Module, heads: Mapping[str, int] | None = None) -> None:
    """Sync every diffusers attribute a prune can invalidate; ``heads`` sets Attention head counts by module name."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.upsampling import Upsample2D

    heads = heads or {}
    for name, module in model.named_modules():
        if isinstance(module, (Upsample2D, Downsample2D)):
            # (avg-pool downsampling has no conv, and no channel count of its own to sync)
            conv = getattr(module, "conv", None)
            if isinstance(conv, nn.Conv2d):
                module.channels = conv.in_channels
                module.out_channels = conv.out_channels
        elif isinstance(module, ResnetBlock2D):
            module.in_channels = module.conv1.in_channels
            module.out_channels = module.conv2.out_channels
        elif isinstance(module, Transformer2DModel) and isinstance(getattr(module, "proj_in", None), (nn.Conv2d, nn.Linear)):
            proj_in, proj_out = module.proj_in, module.proj_out
            module.in_channels = proj_in.in_channels if isinstance(proj_in, nn.Conv2d) else proj_in.in_features
            module.inner_dim = proj_in.out_channels if isinstance(proj_in, nn.Conv2d) else proj_in.out_features
            module.out_channels = proj_out.out_channels if isinstance(proj_out, nn.Conv2d) else proj_out.out_features
        elif isinstance(module, Attention):
            if name in heads:
                module.heads = int(heads[name])
            sync_attention(module, name)

"""A model factory: torchvision's VisionTransformer (the `vit_b_16` architecture) at a size a CPU
trains in seconds: 4×4 patches, 2 encoder blocks of 2 heads, 32 features.

    model: {arch: "examples.tiny_vit:build", kwargs: {hidden_dim: 32}}

Every Linear layer is pruned: the attention projections (prunetune splits torch's
MultiheadAttention into q_proj, k_proj, v_proj and out_proj), the MLP's two layers, the head,
and the patch embedding (a Conv2d). The class token, the position embedding and the layer norms
stay dense.
"""

from torch import nn
from torchvision.models import VisionTransformer


def build(num_classes: int, in_channels: int, image_size: int, patch_size: int = 4, num_layers: int = 2,
          num_heads: int = 2, hidden_dim: int = 32, mlp_dim: int = 64):
    model = VisionTransformer(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim,
                              num_classes=num_classes)
    if in_channels != 3:  # the patch embedding reads the data's channels (digits: 1)
        model.conv_proj = nn.Conv2d(in_channels, hidden_dim, patch_size, patch_size)
    return model

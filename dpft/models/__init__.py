"""dpft.models: NFNet-F0..F7, tiny NFNets, WRN-16-4 (Flax NNX) and DeepMind checkpoint I/O.

    model = dpft.models.create("nfnet_f0", num_classes=10)
    logits = model(images, train=True, key=key)          # float32 [B, 10]
    model = dpft.models.load_pretrained("F0_haiku.npz", "nfnet_f0", num_classes=10)
"""
from dpft.models.registry import MODEL_FAMILIES, create, load_pretrained, names, variant_info, variants

__all__ = ["MODEL_FAMILIES", "create", "load_pretrained", "names", "variant_info", "variants"]

"""dpft.models: NFNet-F0..F7, tiny NFNets, WRN-16-4, ViT-Ti/S/B/16 (Flax NNX); DeepMind (Haiku)
and big_vision/AugReg (ViT .npz) checkpoint I/O.

    model = dpft.models.create("nfnet_f0", num_classes=10)
    logits = model(images, train=True, key=key)          # float32 [B, 10]
    model = dpft.models.load_pretrained("F0_haiku.npz", "nfnet_f0", num_classes=10)
    model = dpft.models.load_pretrained("B_16-i21k-....npz", "vit_b16", num_classes=10)  # zero head
"""
from dpft.models.registry import MODEL_FAMILIES, create, load_pretrained, names, variant_info, variants

__all__ = ["MODEL_FAMILIES", "create", "load_pretrained", "names", "variant_info", "variants"]

"""Networks from timm: building one, its classifier head and drop-path slots, loading weights, ViT analyses."""

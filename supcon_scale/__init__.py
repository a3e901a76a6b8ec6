"""supcon_scale: Supervised Contrastive encoders at ImageNet scale, and their evaluation."""

__version__ = "0.1.0"

"""capscale: Contrastive Pruning (CAP) of pre-trained encoders, from one CPU to many GPUs."""

__version__ = "0.1.0"

"""qlight: train fully quantized CNNs with BCGD, AQE and their baselines in PyTorch Lightning."""

__version__ = "0.1.0"

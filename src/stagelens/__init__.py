"""stagelens: layer-wise probing of multimodal LLMs (arXiv 2508.20279 and extensions)."""

__version__ = "0.1.0"

"""deploykit: prune, distill, export and benchmark diffusion models, and prove the speedup."""

__version__ = "0.1.0"

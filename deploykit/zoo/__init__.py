"""Zoo teachers: trained by ``deploykit zoo train NAME``, shipped as safetensors."""

from deploykit.zoo.registry import ZOO, ZooEntry, get_entry

__all__ = ["ZOO", "ZooEntry", "get_entry"]

"""prefopt: preference optimisation from SFT to aligned policy, one reproducible stage at a time."""

__version__ = "0.1.0"

"""mahals: activation capture on nnsight, the Alignment Quality Index, and D-STEER steering vectors."""

__version__ = "0.1.0"

"""Once-for-All: train one elastic supernet, specialize it for many hardware targets."""

__version__ = "0.1.0"

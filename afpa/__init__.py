"""afpa: a state-machine protocol accelerator and layer-7 router on Twisted."""

__version__ = "0.1.0"

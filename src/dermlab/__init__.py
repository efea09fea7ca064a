"""dermlab: train, evaluate, explain and serve skin-lesion image classifiers. A research tool, not a medical device."""

__version__ = "0.1.0"
__all__ = ["__version__"]

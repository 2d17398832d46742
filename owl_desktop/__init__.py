"""owl-desktop: private, local chat about images with mPLUG-Owl on llama.cpp."""

__version__ = "0.1.0"

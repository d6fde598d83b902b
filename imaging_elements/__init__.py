"""imaging_elements: an imaging toolkit driven by element hook directories."""

__version__ = "0.1.0"

"""The imaging service: the EC2 VM Import API over a persistent task queue.

A separate layer over the toolkit: it drives imaging_elements only through
imaging_elements.api.
"""

__version__ = "0.1.0"

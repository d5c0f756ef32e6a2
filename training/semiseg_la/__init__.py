"""SemiSegLA: semi-supervised left-atrium segmentation (headless core).

Layers, one direction of dependency: io -> preprocess -> models -> methods -> engine ->
inference -> checkpoints -> cli. `metrics` depends on numpy/scipy only.
"""

__version__ = "0.1.0"

"""ShapeWorld generator: the synthetic world (images, depth/segmentation maps, questions) behind `olavlm demo`.

A leaf package: it imports nothing from olavlm outside itself, so the oracle teachers can use it.
"""

"""The `olavlm demo` application: bootstrap base models, run OLA vs baseline PT + IFT, write the report.

The recipes it runs live in ``recipes/`` (package data; ``configs/shapeworld`` in the source tree points here).
"""

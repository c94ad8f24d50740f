"""Pure computation: volumes and masks in, numbers and masks out.

Nothing here imports :mod:`node` or reads settings; every function takes explicit arguments.
"""

"""The main job's stages, one module per part of the path: data, synthetic queries, mining,
training, evaluation, serving; :mod:`.runner` runs a stage unless it is done."""

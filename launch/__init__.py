"""What a user launches from a clone: the main job (``python -m launch.pipeline``, its stages in
:mod:`launch.stages`), the DeepSpeed training entry (``launch/train.py``) and the shipped
configs. The top layer: it may use every part of ``llmembed`` and ``synth``; nothing imports it."""

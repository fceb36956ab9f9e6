"""DeepSpeed presets (zero2, zero3, zero3_offload), installed as the package ``llmembed.ds_configs``.

The JSON files here are the single copy: pyproject.toml maps this folder into the package, so a
wheel or ``pip install .`` carries them and ``llmembed.train.deepspeed_config`` reads them with
``importlib.resources``, never from a repository checkout.
"""

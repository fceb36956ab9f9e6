"""Offline evaluation: the suite as local mteb tasks (``suite``), our encoders as an mteb model
(``mteb_adapter``), and running them (``runner``, ``python -m llmembed.evaluate``)."""

"""synth: E5-mistral-style synthetic training data for text embedders.

``python -m synth.generate --out DIR`` brainstorms tasks and generates instructed
query/positive/hard-negative examples through a backend (vLLM, an OpenAI-compatible endpoint,
or transformers on CPU). Importing ``synth`` never imports vLLM.
"""

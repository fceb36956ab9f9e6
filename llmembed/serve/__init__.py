"""What ships a model and reads shipped ones: the export to a sentence-transformers folder
(:mod:`.export`), its parity check against every serving path (:mod:`.verify`), the
sentence-transformers module for heads ST lacks (:mod:`.st_modules`), the vLLM worker
(:mod:`.vllm_embed`), and any model folder, ours or another's, as a text encoder for the tools
(:mod:`.encoders`). It sits above the model core and below the tools that use it."""

"""Quickstart on the built-in default: build, encode, save, export, reload in sentence-transformers.

``python -m llmembed.quickstart --out runs/quickstart`` runs on CPU with no hub access. It is
the smallest end-to-end tour of the model core; training arrives with ``launch/train.py``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from llmembed import EmbeddingModel, EmbeddingModelConfig, PoolingConfig
from llmembed.export import export

QUERIES = ["how do plants make their food?", "what makes the sky blue?", "who wrote Hamlet?"]
PASSAGES = [
    "Photosynthesis lets plants turn light, water and carbon dioxide into sugar.",
    "Sunlight scatters off air molecules, and blue light scatters the most.",
    "Hamlet is a tragedy written by William Shakespeare around 1600.",
]
INSTRUCTION = "Given a question, retrieve passages that answer it"


def _table(title: str, sims: np.ndarray) -> str:
    lines = [title, f"{'query':<34}" + "".join(f"{'passage ' + str(j):>11}" for j in range(sims.shape[1]))]
    for i, row in enumerate(sims):
        lines.append(f"{QUERIES[i][:32]:<34}" + "".join(f"{v:>11.3f}" for v in row))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmembed.quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quickstart", help="output folder")
    parser.add_argument("--pooling", default="mean", choices=("last_token", "mean", "latent_attention"))
    parser.add_argument("--bidirectional", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)

    start = time.perf_counter()
    config = EmbeddingModelConfig(pooling=PoolingConfig(args.pooling))
    config.backbone.bidirectional = args.bidirectional
    config.prompts.default_instruction = INSTRUCTION
    model = EmbeddingModel.build(config)
    q = model.encode(QUERIES, instruction=INSTRUCTION)
    p = model.encode(PASSAGES)
    print(_table(f"llmembed encode ({args.pooling}, default backbone)", q @ p.T))
    model.save(out / "model")
    export(out / "model", out / "export", overwrite=True)

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out / "export"), device="cpu", trust_remote_code=args.pooling == "latent_attention")
    q_st, p_st = st.encode(QUERIES, prompt_name="query"), st.encode(PASSAGES)
    print(_table("sentence-transformers on the export", q_st @ p_st.T))
    agreement = min(float((q * q_st).sum(1).min()), float((p * p_st).sum(1).min()))
    print(f"\nmodel folder: {out / 'model'}\nexport:       {out / 'export'}")
    print(f"min cosine llmembed vs sentence-transformers: {agreement:.6f}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0 if agreement >= 0.9999 else 1


if __name__ == "__main__":
    raise SystemExit(main())

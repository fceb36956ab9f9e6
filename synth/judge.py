"""The generator LLM as a judge of (query, passage) pairs: query likelihood and a yes/no
relevance judgement, through any backend that scores continuations, and their fusion by
reciprocal rank. Light on purpose (numpy and the backends only), so it runs in an environment
that holds vLLM and nothing of the trainer."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from synth.backends import Backend, ScoreRequest

# The judge's prompts: the passage first (fixed per passage), the query last.
LIKELIHOOD_CONTEXT = "Passage: {passage}\n{label}:"
RELEVANCE_CONTEXT = "Passage: {passage}\nQuery: {query}\nDoes the passage answer the query? Answer Yes or No.\nAnswer:"
YES, NO = " Yes", " No"
DEFAULT_LABEL = "Query"


class Judge:
    """The generator LLM as a judge of (query, passage) pairs, through any scoring backend."""

    def __init__(self, backend: Backend, relevance: bool) -> None:
        self.backend = backend
        self.relevance = relevance
        self.yes = backend.tokenize(YES, special=False)
        self.no = backend.tokenize(NO, special=False)

    def requests(self, query: str, passage: str, label: str) -> list[ScoreRequest]:
        tok = self.backend.tokenize
        out = [ScoreRequest(tok(LIKELIHOOD_CONTEXT.format(passage=passage, label=label), True),
                            tok(" " + query.strip(), False))]
        if self.relevance:
            context = tok(RELEVANCE_CONTEXT.format(passage=passage, query=query.strip()), True)
            out += [ScoreRequest(context, self.yes), ScoreRequest(context, self.no)]
        return out

    def score(self, pairs: Sequence[tuple[str, str, str]]) -> np.ndarray:
        """Rows of (query likelihood, relevance log-odds or 0) for (query, passage, label) pairs."""
        per = 3 if self.relevance else 1
        requests = [r for q, p, label in pairs for r in self.requests(q, p, label)]
        logprobs = self.backend.score(requests)
        rows = []
        for n in range(len(pairs)):
            got = logprobs[n * per : (n + 1) * per]
            likelihood = float(np.mean(got[0]))
            relevance = float(sum(got[1]) - sum(got[2])) if self.relevance else 0.0
            rows.append((likelihood, relevance))
        return np.asarray(rows, dtype=np.float64).reshape(len(pairs), 2)


def fused_order(likelihood: Sequence[float], relevance: Sequence[float] | None, k: int) -> list[int]:
    """Candidate indices by reciprocal-rank fusion of the two judgements (ties: the earlier
    candidate, i.e. the seed, first)."""
    n = len(likelihood)
    fused = np.zeros(n)
    for scores in ([likelihood] + ([relevance] if relevance is not None else [])):
        order = sorted(range(n), key=lambda i: (-scores[i], i))
        for rank, i in enumerate(order):
            fused[i] += 1.0 / (k + rank + 1)
    return sorted(range(n), key=lambda i: (-fused[i], i))



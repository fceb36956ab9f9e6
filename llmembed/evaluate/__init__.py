"""Offline evaluation."""

from llmembed.evaluate.retrieval import RetrievalScores, evaluate_retrieval

__all__ = ["RetrievalScores", "evaluate_retrieval"]

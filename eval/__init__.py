"""Evaluation jobs: perplexity (and latency benchmarks as they land). Imported as `quantkit.eval`."""

from quantkit.eval.perplexity import perplexity

__all__ = ["perplexity"]

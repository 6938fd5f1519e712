"""Evaluation jobs, installed as `quantkit.eval`: perplexity, result tables, kernel and latency benchmarks."""

if __name__ != "quantkit.eval":  # imported as a bare `eval` from the repository root
    from quantkit.shadowing import hand_over

    hand_over(__name__, __file__)
else:
    from quantkit.eval.perplexity import perplexity

    __all__ = ["perplexity"]

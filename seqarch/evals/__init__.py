"""Long-context evals: perplexity vs context length and passkey retrieval (`seqarch eval`)."""

from seqarch.evals.command import eval_command, evaluate
from seqarch.evals.passkey import passkey_accuracy
from seqarch.evals.perplexity import perplexity_vs_length

__all__ = ["eval_command", "evaluate", "passkey_accuracy", "perplexity_vs_length"]

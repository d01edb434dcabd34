"""Long-context evals: perplexity vs context length and passkey retrieval (`seqarch eval`).

    run_eval(EvalConfig(ckpt=..., task="ppl"))   # the typed entry point; `seqarch eval` wraps it
"""

from seqarch.evals.command import EvalConfig, eval_command, evaluate, parse_eval_config, run_eval
from seqarch.evals.passkey import passkey_accuracy
from seqarch.evals.perplexity import perplexity_vs_length

__all__ = ["EvalConfig", "eval_command", "evaluate", "parse_eval_config", "passkey_accuracy", "perplexity_vs_length",
           "run_eval"]

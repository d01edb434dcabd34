"""Training: recipes and overrides, the LightningModule and DataModule, `train` (typed) and `fit` (the CLI's)."""

from seqarch.overrides import ConfigError  # its home is seqarch.overrides; importable from here as before
from seqarch.train.config import RunConfig, list_recipes, load_recipe, resolve
from seqarch.train.fit import fit, generate, train

__all__ = ["ConfigError", "RunConfig", "fit", "generate", "list_recipes", "load_recipe", "resolve", "train"]

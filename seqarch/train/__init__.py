"""Training: recipes and overrides, the LightningModule and DataModule, run folders, `fit`."""

from seqarch.train.config import ConfigError, RunConfig, list_recipes, load_recipe, resolve
from seqarch.train.fit import fit, generate

__all__ = ["ConfigError", "RunConfig", "fit", "generate", "list_recipes", "load_recipe", "resolve"]

"""Ready-made LightningModules and data for examples and experiments (not needed to use the strategy)."""

from lightning_pipe.models.chardata import CharDataModule, python_corpus
from lightning_pipe.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "CharDataModule", "python_corpus"]

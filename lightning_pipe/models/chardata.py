"""Character-level text data that every machine has without a download: source files of the Python installation."""

from __future__ import annotations

import os
import sysconfig
from typing import Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

__all__ = ["python_corpus", "CharDataset", "CharDataModule"]

_DEFAULT_MODULES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py",
                    "colorsys.py", "keyword.py", "this.py", "calendar.py", "difflib.py")


def python_corpus(files: Sequence[str] = _DEFAULT_MODULES, max_chars: int = 400_000) -> str:
    """The text of a few standard-library modules (the same on every machine with this Python version)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    parts = []
    for name in files:
        path = os.path.join(stdlib, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                parts.append(f.read())
    text = "\n".join(parts)
    if not text:
        raise FileNotFoundError(f"none of {list(files)} found under {stdlib}")
    return text[:max_chars]


class CharDataset(Dataset):
    """Windows of ``block_size + 1`` characters starting every ``stride`` characters."""

    def __init__(self, data: torch.Tensor, block_size: int, stride: int) -> None:
        self.data, self.block_size = data, block_size
        self.starts = range(0, len(data) - block_size - 1, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.data[self.starts[i] : self.starts[i] + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class CharDataModule(LightningDataModule):
    """90/10 split of :func:`python_corpus`, encoded as character ids."""

    def __init__(self, block_size: int = 64, batch_size: int = 32, stride: int = 16, max_chars: int = 400_000) -> None:
        super().__init__()
        text = python_corpus(max_chars=max_chars)
        self.chars = sorted(set(text))
        self.vocab_size = len(self.chars)
        index = {c: i for i, c in enumerate(self.chars)}
        data = torch.tensor([index[c] for c in text], dtype=torch.long)
        split = int(0.9 * len(data))
        self.train_data, self.val_data = data[:split], data[split:]
        self.block_size, self.batch_size, self.stride = block_size, batch_size, stride

    def unigram_loss(self) -> float:
        """Cross-entropy of predicting each validation character from training-set frequencies alone."""
        counts = torch.bincount(self.train_data, minlength=self.vocab_size).double() + 1.0
        logp = (counts / counts.sum()).log()
        return float(-logp[self.val_data].mean())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(CharDataset(self.train_data, self.block_size, self.stride), batch_size=self.batch_size,
                          shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(CharDataset(self.val_data, self.block_size, self.block_size), batch_size=self.batch_size)

"""The judges' cache: digit classifiers and realism judges (pipeline.judges) kept as safetensors, so
that every evaluation of the same data with the same recipe loads the judge instead of training it."""

import os
from dataclasses import dataclass

import torch

from pipeline.judges import load_classifier, recipe_key, save_classifier


@dataclass
class JudgeCache:
    """Judges in `folder` (None: nothing kept), named by the data they learnt from (the manifest's
    content hash, the image size and `train_images` per domain) and the recipe's hash. What was
    loaded, trained or saved goes to `notes`."""

    folder: str | None
    content_hash: str
    train_images: int
    device: torch.device
    notes: list

    def path(self, name, size, recipe):
        """The judge's file: the data's content hash, what it reads, and the recipe's hash."""
        if not self.folder:
            return None
        key = f"{name}-{self.content_hash[:16]}-s{size}-n{self.train_images}-{recipe_key(recipe)}"
        return os.path.join(self.folder, key + ".safetensors")

    def load_or_train(self, label, path, fit, recipe):
        """(judge, its file or None): loaded from `path` when there, else `fit()` and saved there."""
        if path and os.path.isfile(path):
            self.notes.append(f"{label}: loaded {path}")
            return load_classifier(path, self.device), path
        net = fit()
        self.notes.append(f"{label}: trained, {f'saved {path}' if path else 'not kept (no cache_dir)'}")
        return net, (save_classifier(net, path, recipe) if path else None)

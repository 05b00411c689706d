"""What an Evaluator is built from besides the model: the data it reads and the settings of its
metrics and judges, read from a RunConfig by `EvalOptions.from_config`."""

import os
from dataclasses import dataclass

from pipeline.run_config import image_size


@dataclass
class EvalOptions:
    """The evaluator's settings. From a RunConfig: the data's location, splits, image size and
    swap_ab (data), max_images, label_domain, num_classes and inception_path (eval), the seed
    (train) and the judges' cache (<home>/cache). The rest keeps its default in a run and is
    there for tests and studies: judges' training settings over their recipes (`classifier`,
    `realism`, pipeline.judges), `train_images` per domain for them, BicycleGAN's
    `diversity_samples`, CoGAN's generated `pairs`, the inference `mode` and `dropout`."""

    data_path: str
    train_split: str = "train"
    size: int | None = None  # None: as stored (CoGAN: the model's image_size)
    max_images: int = 64  # evaluation images per domain
    label_domain: str = "b"  # the domain holding label maps; "" = none
    num_classes: int = 0  # label palette size; 0 = no segmentation scores
    cache_dir: str | None = None  # judges kept here as safetensors; None = trained every time
    endpoint: str | None = None
    inception_path: str = ""  # TorchScript Inception on disk for FID/KID; "" = skip
    seed: int = 0
    diversity_samples: int = 4
    train_images: int = 4000
    classifier: dict | None = None
    realism: dict | None = None
    pairs: int = 256
    swap_ab: bool = False  # as the run's data.swap_ab: a and b (and their labels) trade places
    mode: str = "auto"  # inference mode of metrics and grids (models.norms.inference_mode)
    dropout: bool = False  # keep dropout on at inference (pix2pix's test script)

    @classmethod
    def from_config(cls, cfg):
        """The options of a RunConfig's run (image size: the crop size, else the load size)."""
        return cls(
            cfg.data.path, train_split=cfg.data.train_split,
            size=image_size(cfg), max_images=cfg.eval.max_images,
            label_domain=cfg.eval.label_domain, num_classes=cfg.eval.num_classes,
            cache_dir=os.path.join(cfg.home, "cache"), endpoint=cfg.storage.endpoint or None,
            inception_path=cfg.eval.inception_path, seed=cfg.train.seed, swap_ab=cfg.data.swap_ab,
        )  # fmt: skip

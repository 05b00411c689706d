"""Evaluation: sampling grids for people to look at, and quality metrics for the loop to log.

Where each part lives: `grids` (inference modes, translation grids, PNGs, the norm study's figure),
`metrics` (L1, PSNR, SSIM, diversity, the FCN segmentation scores), `palettes` (label colours learnt
from the training label maps, class maps), `fid` (FID and KID from a TorchScript Inception on disk),
`judging` (the cache of the digit and realism judges of pipeline.judges), `options` (what an
Evaluator is built from, read from a RunConfig) and `evaluator` (the Evaluator). Every name other
modules use is importable from here.

Images are N×C×H×W float tensors in [-1, 1] (C = 1 or 3). The metric functions are pure and
return per-batch means as Python floats. `Evaluator` owns the data, the one-off work (label
palettes, digit classifiers, baselines) and the choice of metrics for a model (the families its
ModelSpec declares, `metric_families`) and a dataset:

- aligned pairs (facades, weizmann_horse): `eval/{l1,psnr,ssim}_<dir>` against the ground truth,
  and for the direction that outputs the label domain `eval/{pixel_acc,class_acc,class_iou}_<dir>`
  (the photo→labels score of the CycleGAN paper, with a palette derived from the training labels;
  class means over present classes) and `eval/{class_acc_all,class_iou_all}_<dir>` (means over all
  classes, absent ones counting 0, as the reference's evaluation script);
- unpaired labelled digits (mnist2mnistm): `eval/label_acc_<dir>`, the accuracy of a classifier
  trained on real images of the output domain on the translated test images;
- a generator of pairs ("pairs", CoGAN): `eval/pair_agreement`, how often the two domain
  classifiers agree on a generated pair;
- both directions: `eval/cycle_l1_a`, `eval/cycle_l1_b`; a multimodal model ("diversity",
  BicycleGAN): `eval/diversity`;
- with a TorchScript Inception on disk: `eval/fid_<dir>`, `eval/kid_<dir>`.
`baseline/...` (a trivial predictor) and `ceiling/...` (the metric's own limit) put them in scale.
"""

from pipeline.evaluation.evaluator import SWAP, Evaluator
from pipeline.evaluation.fid import (
    FID_SKIPPED,
    extract_features,
    frechet_distance,
    kernel_inception_distance,
    load_feature_extractor,
)
from pipeline.evaluation.grids import (
    eval_mode,
    match_channels,
    norm_study_figure,
    resolve_mode,
    save_png,
    tile,
    to_rgb,
    train_eval_outputs,
    translate_in_mode,
    translation_grid,
)
from pipeline.evaluation.judging import JudgeCache
from pipeline.evaluation.metrics import diversity, gaussian_window, l1, psnr, segmentation_scores, ssim
from pipeline.evaluation.options import EvalOptions
from pipeline.evaluation.palettes import derive_palette, snap_to_palette

# the judges were importable from the old pipeline.evaluation module: they stay so
from pipeline.judges import (
    COLOUR_RECIPE,
    DIGIT_RECIPE,
    REALISM_RECIPE,
    DigitClassifier,
    accuracy,
    class_entropy,
    load_classifier,
    pair_agreement,
    predict,
    realism,
    recipe_key,
    save_classifier,
    tint,
    train_classifier,
    train_realism_judge,
)

__all__ = [
    "COLOUR_RECIPE", "DIGIT_RECIPE", "FID_SKIPPED", "REALISM_RECIPE", "SWAP", "DigitClassifier",
    "EvalOptions", "Evaluator", "JudgeCache", "accuracy", "class_entropy", "derive_palette", "diversity",
    "eval_mode", "extract_features", "frechet_distance", "gaussian_window", "kernel_inception_distance",
    "l1", "load_classifier", "load_feature_extractor", "match_channels", "norm_study_figure",
    "pair_agreement", "predict", "psnr", "realism", "recipe_key", "resolve_mode", "save_classifier",
    "save_png", "segmentation_scores", "snap_to_palette", "ssim", "tile", "tint", "to_rgb",
    "train_classifier", "train_eval_outputs", "train_realism_judge", "translate_in_mode",
    "translation_grid",
]  # fmt: skip

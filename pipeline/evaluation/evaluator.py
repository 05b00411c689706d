"""The Evaluator: the data, the one-off work (label palettes, judges, baselines) and the choice of
metrics for a model and a dataset (see the package docstring for what it reports)."""

import os

import torch

from models import MODELS
from models.norms import run_generator
from pipeline.data import LocalReader, ReadSpec, read_manifest
from pipeline.evaluation.fid import (
    FID_SKIPPED,
    extract_features,
    frechet_distance,
    kernel_inception_distance,
    load_feature_extractor,
)
from pipeline.evaluation.grids import match_channels, resolve_mode, tile, to_rgb
from pipeline.evaluation.judging import JudgeCache
from pipeline.evaluation.metrics import diversity, l1, psnr, segmentation_scores, ssim
from pipeline.evaluation.options import EvalOptions
from pipeline.evaluation.palettes import derive_palette, snap_to_palette
from pipeline.judges import (
    COLOUR_RECIPE,
    DIGIT_RECIPE,
    REALISM_RECIPE,
    accuracy,
    class_entropy,
    pair_agreement,
    realism,
    tint,
    train_classifier,
    train_realism_judge,
)

SWAP = {"a": "b", "b": "a", "label_a": "label_b", "label_b": "label_a"}


class Evaluator:
    """Metrics of one run, built once by the loop (`from_config`) and called at each evaluation.

    Construction does the one-off work: read the first `options.max_images` of `split` (unaugmented,
    in the reader's seeded order, so a class-ordered set still gives a mixed sample), scan the
    training split for mean images and the label palette (aligned data), and train or load the
    judges (labelled data, see pipeline.judges; up to `train_images` per domain, trained with the
    `classifier` settings over DIGIT_RECIPE (+ COLOUR_RECIPE for colour domains) and the `realism`
    settings over REALISM_RECIPE, cached in `cache_dir` as safetensors when given, under a name
    with the data's content hash and the recipe's hash; see EvalOptions). `metrics(nets)` then only
    translates and scores. `notes` says what was skipped and why, and each judge's accuracy on the
    real images.

    `options.mode` is the inference mode of `metrics` and `grids` unless they are given another:
    "auto" resolves to `self.mode`, per_image for a batch-norm generator and eval otherwise (see
    pipeline.evaluation.grids); `options.dropout=True` keeps dropout on (pix2pix's test script).
    """

    @classmethod
    def from_config(cls, cfg, split, device="cpu", spec=None, model_cfg=None):
        """The evaluator of a RunConfig's `split`: its data, eval and seed settings (EvalOptions),
        for `model_cfg` (default cfg.model; the loop passes its effective model config)."""
        spec = spec or MODELS[cfg.model_name]
        return cls(spec, model_cfg or cfg.model, EvalOptions.from_config(cfg), split, device)

    def __init__(self, spec, model_cfg, options: EvalOptions, split="val", device="cpu"):
        o = options
        self.mode, self.dropout = resolve_mode(spec, model_cfg, o.mode), o.dropout
        self.swap_ab = o.swap_ab  # as the run's data.swap_ab: a and b (and their labels) trade places
        self.spec, self.cfg, self.device, self.seed = spec, model_cfg, torch.device(device), o.seed
        self.data_path, self.train_split, self.endpoint = o.data_path, o.train_split, o.endpoint
        self.size = o.size or spec.image_size(model_cfg)  # a generator from z has one fixed size
        self.train_images = o.train_images
        self.classifier_settings = {**(o.classifier or {}), "seed": o.seed}  # over the domain's recipe
        self.realism_settings = {**REALISM_RECIPE, **(o.realism or {}), "seed": o.seed}
        self.diversity_samples, self.pairs = o.diversity_samples, o.pairs
        self.manifest = read_manifest(o.data_path, o.endpoint)
        self.channels = {"a": model_cfg.channels_a, "b": model_cfg.channels_b}
        self.directions = [d for d in spec.directions if d in ("ab", "ba")]
        self.aligned = self.manifest["layout"] == "aligned"
        self.notes: list[str] = []
        self.judge_cache = JudgeCache(o.cache_dir, self.manifest["content_hash"], o.train_images, self.device,
                                      self.notes)  # fmt: skip
        self.data = self._read(split, o.max_images)
        self.mean_images, self.palette, self.class_counts = {}, None, None
        self.classifiers, self.classifier_files = {}, {}
        self.realism_judges, self.judge_accuracy = {}, {}
        self.label_direction = self._label_direction(o.label_domain, o.num_classes)
        self.num_classes = o.num_classes
        if self.aligned:
            self._scan_train()
        elif spec.generates_pairs or self.directions:
            self._prepare_classifiers()
        self.extractor, self._real_feats = self._load_extractor(o.inception_path), {}
        self._baselines = None

    # ------------------------------------------------------------------ data

    def _batches(self, split, limit):
        """Batches of `split` with the model's channels per domain, each domain cut at `limit`."""
        reader = LocalReader(ReadSpec(self.data_path, split, batch_size=min(limit, 256), load_size=self.size,
                                      flip=False, seed=self.seed, endpoint=self.endpoint))
        counts = {k: min(limit, n) for d, n in reader.counts.items() for k in ("ab" if d == "ab" else d)}
        if self.swap_ab:
            counts = {SWAP[k]: n for k, n in counts.items()}
        taken = 0
        for batch in reader:
            if self.swap_ab:  # the run translates the stored b side to the stored a side
                batch = {SWAP.get(k, k): v for k, v in batch.items()}
            out = {}
            for key, value in batch.items():
                value = value[: max(0, counts[key[-1]] - taken)]
                if len(value):  # a smaller domain stops early rather than repeat its images
                    is_label = key.startswith("label_")
                    out[key] = value if is_label else match_channels(value, self.channels[key])
            taken += len(next(iter(batch.values())))
            yield out
            if taken >= max(counts.values()):
                return

    def _read(self, split, limit):
        parts = {}
        for batch in self._batches(split, limit):
            for key, value in batch.items():
                parts.setdefault(key, []).append(value)
        return {key: torch.cat(values) for key, values in parts.items()}

    def _label_direction(self, label_domain, num_classes):
        if not (self.aligned and label_domain and num_classes > 0):
            if self.aligned and label_domain and not num_classes:
                self.notes.append(
                    "segmentation scores skipped: set num_classes (facades 12, weizmann_horse 2)"
                )
            return None
        if label_domain not in ("a", "b"):
            raise ValueError(f"label_domain must be 'a', 'b' or '' (none), got {label_domain!r}")
        direction = {"a": "ba", "b": "ab"}[label_domain]
        if direction not in self.directions:
            self.notes.append(f"segmentation scores skipped: {self.spec.name} does not translate {direction}")
            return None
        return direction

    def _scan_train(self):
        """Mean training image per domain, and the label palette from a pixel subsample."""
        sums, counts, samples = {}, {}, []
        label = self.label_direction[1] if self.label_direction else None
        for batch in self._batches(self.train_split, self.train_images):
            for d in ("a", "b"):
                if d in batch:
                    sums[d] = sums.get(d, 0) + batch[d].double().sum(0, keepdim=True)
                    counts[d] = counts.get(d, 0) + len(batch[d])
            if label:
                stride = max(1, batch[label].shape[-1] // 64)  # ≤ 64×64 pixels per image suffice
                samples.append(batch[label][:, :, ::stride, ::stride])
        self.mean_images = {d: (sums[d] / counts[d]).float() for d in sums}
        if label:
            samples = torch.cat(samples)
            self.palette = derive_palette(samples, self.num_classes, seed=self.seed)
            maps = snap_to_palette(samples, self.palette)
            self.class_counts = torch.bincount(maps.flatten(), minlength=self.num_classes)

    def _prepare_classifiers(self):
        labelled = [d for d in ("a", "b") if self.manifest["domains"].get(d, {}).get("labelled")]
        wanted = ["a", "b"] if self.spec.generates_pairs else [d[1] for d in self.directions]
        missing = sorted({"a", "b"} - set(labelled))  # inputs' labels are the truth, outputs' train
        if missing:
            self.notes.append(f"label metrics skipped: domain(s) {missing} have no labels")
            return
        sizes = {self.data[d].shape[-1] for d in ("a", "b") if d in self.data}
        if len(sizes) > 1:
            raise ValueError(f"domains a and b are read at sizes {sorted(sizes)}: pass size= (e.g. "
                             f"{max(sizes)}) so that translations and classifiers see one size")  # fmt: skip
        size, train = sizes.pop(), {}
        for d in wanted:
            self.classifiers[d] = self._classifier(d, size, train)
        for d, net in self.classifiers.items():  # each figure's ceiling: the judge on real images
            self.judge_accuracy[d] = accuracy(net, self.data[d], self.data[f"label_{d}"])
            self.notes.append(f"classifier {d}: accuracy {self.judge_accuracy[d]:.4f} on "
                              f"{len(self.data[d])} real images of this split")  # fmt: skip
        for d in self.directions:
            if self.channels[d[0]] == 1 and self.channels[d[1]] == 3:  # gray → colour (MNIST → MNIST-M)
                self.realism_judges[d] = self._realism_judge(d, size, train)

    def classifier_recipe(self, domain):
        colour = COLOUR_RECIPE if self.channels[domain] == 3 else {}
        return {**DIGIT_RECIPE, **colour, **self.classifier_settings}

    def _classifier(self, domain, size, train):
        """Trained on the labelled training images of `domain`; loaded instead when cached. `train`
        holds the training split once read, for the next judge."""
        recipe = self.classifier_recipe(domain)
        path = self.judge_cache.path(f"digits-{domain}-c{self.channels[domain]}", size, recipe)

        def fit():
            self._read_train(train)
            return train_classifier(train[domain], train[f"label_{domain}"], recipe, device=self.device)

        net, path = self.judge_cache.load_or_train(f"classifier {domain}", path, fit, recipe)
        if path:
            self.classifier_files[domain] = path
        return net

    def _realism_judge(self, direction, size, train):
        """Real images of the output domain against tinted input-domain images (pipeline.judges)."""
        source, target = direction
        recipe = self.realism_settings
        path = self.judge_cache.path(f"realism-{direction}", size, recipe)

        def fit():
            self._read_train(train)
            return train_realism_judge(train[target], train[source], recipe, device=self.device)

        return self.judge_cache.load_or_train(f"realism judge {direction}", path, fit, recipe)[0]

    def _read_train(self, train):
        if not train:
            train.update(self._read(self.train_split, self.train_images))

    def _tinted(self, domain):
        """The eval images of a gray `domain` tinted with a fixed seed: the realism floor."""
        return tint(self.data[domain], torch.Generator().manual_seed(self.seed + 2000))

    def _load_extractor(self, path):
        if not path:
            self.notes.append(FID_SKIPPED)
            return None
        if not os.path.isfile(path):
            self.notes.append(
                f"FID/KID skipped: eval.inception_path {path} does not exist; nothing is downloaded"
            )
            return None
        return load_feature_extractor(path, self.device)

    # ------------------------------------------------------------------ translation

    def _translate(self, nets, x, direction, mode, z=None, batch_size=64):
        """Outputs on the CPU in inference `mode`; a multimodal model (BicycleGAN) gets z = 0 (its
        mean output) unless z is given."""
        if z is None and self.spec.multimodal:
            z = torch.zeros(len(x), self.spec.latent_size(self.cfg))
        run = lambda xi, zi: self.spec.translate(self.cfg, nets, xi, direction, zi)  # noqa: E731
        outs = []
        for i in range(0, len(x), batch_size):
            xi = x[i:i + batch_size].to(self.device)
            zi = None if z is None else z[i:i + batch_size].to(self.device)
            outs.append(run_generator(run, nets, xi, zi, mode, self.dropout))
        return torch.cat(outs).float().cpu()

    def _random_z(self, n, offset=0):
        """The same codes at every evaluation, so that curves compare like with like."""
        g = torch.Generator().manual_seed(self.seed + 1000 + offset)
        return torch.randn(n, self.spec.latent_size(self.cfg), generator=g)

    def _generate_pairs(self, nets, n, mode):
        z, pairs = self._random_z(n), []
        run = lambda _, zi: self.spec.translate(self.cfg, nets, None, "pair", zi)  # noqa: E731
        for i in range(0, n, 128):
            x_a, x_b = run_generator(run, nets, None, z[i:i + 128].to(self.device), mode, self.dropout)
            pairs.append((x_a.float().cpu(), x_b.float().cpu()))
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    # ------------------------------------------------------------------ metrics

    def metrics(self, nets, mode=None):
        """{"eval/...": float} for the current nets in inference `mode` (default `self.mode`, the
        mode a user is served); modes and buffers are left as found."""
        mode = self.mode if mode in (None, "auto") else mode
        if "pairs" in self.spec.metric_families:
            return self._pair_metrics(nets, mode)
        out = {}
        outputs = {d: self._translate(nets, self.data[d[0]], d, mode) for d in self.directions}
        if self.aligned:
            for d, fake in outputs.items():
                out.update(self._paired_scores(d, fake, self.data[d[1]], "eval"))
            if "diversity" in self.spec.metric_families and self.diversity_samples > 1:
                out["eval/diversity"] = diversity(self._z_samples(nets, self.data["a"], mode))
        for d, fake in outputs.items():
            if d[1] in self.classifiers:  # is the digit still the same digit?
                labels = self.data[f"label_{d[0]}"]
                out[f"eval/label_acc_{d}"] = accuracy(self.classifiers[d[1]], fake, labels)
            if d in self.realism_judges:  # does it look like the output domain, not a tinted input?
                out[f"eval/realism_{d}"] = realism(self.realism_judges[d], fake)
        if set(outputs) == {"ab", "ba"}:
            out["eval/cycle_l1_a"] = l1(self._translate(nets, outputs["ab"], "ba", mode), self.data["a"])
            out["eval/cycle_l1_b"] = l1(self._translate(nets, outputs["ba"], "ab", mode), self.data["b"])
        for d, fake in outputs.items():
            out.update(self._fid(d, d[1], fake))
        return out

    def _z_samples(self, nets, x, mode):
        return [self._translate(nets, x, "ab", mode, self._random_z(len(x), offset=k))
                for k in range(self.diversity_samples)]  # fmt: skip

    def _paired_scores(self, direction, fake, real, prefix):
        out = {
            f"{prefix}/l1_{direction}": l1(fake, real),
            f"{prefix}/psnr_{direction}": psnr(fake, real),
            f"{prefix}/ssim_{direction}": ssim(fake, real),
        }
        if direction == self.label_direction:
            true = snap_to_palette(real, self.palette)
            scores = segmentation_scores(snap_to_palette(fake, self.palette), true, self.num_classes)
            out.update({f"{prefix}/{k}_{direction}": v for k, v in scores.items()})
        return out

    def _pair_metrics(self, nets, mode):
        out = {}
        x_a, x_b = self._generate_pairs(nets, self.pairs, mode)
        if {"a", "b"} <= set(self.classifiers):
            cls_a, cls_b = self.classifiers["a"], self.classifiers["b"]
            out["eval/pair_agreement"] = pair_agreement(cls_a, cls_b, x_a, x_b)
            out["eval/pair_class_entropy"] = class_entropy(cls_a, x_a)  # 1: all ten digits drawn evenly
            for d in "ab":  # beside it, how well each judge reads real digits: agreement is read against them
                out[f"eval/judge_acc_{d}"] = self.judge_accuracy[d]
        out.update(self._fid("a", "a", x_a))
        out.update(self._fid("b", "b", x_b))
        return out

    def _fid(self, name, domain, fake):
        if self.extractor is None:
            return {}
        if domain not in self._real_feats:
            self._real_feats[domain] = extract_features(self.extractor, self.data[domain])
        real, feats = self._real_feats[domain], extract_features(self.extractor, fake)
        return {
            f"eval/fid_{name}": frechet_distance(feats, real),
            f"eval/kid_{name}": kernel_inception_distance(feats, real),
        }

    # ------------------------------------------------------------------ baselines

    def baselines(self):
        """{"baseline/...", "ceiling/...": float}: what a trivial predictor scores, and the metric's
        own limit. They do not depend on the nets, so they are computed once."""
        if self._baselines is None:
            self._baselines = self._compute_baselines()
        return dict(self._baselines)

    def _compute_baselines(self):
        out = {}
        if self.aligned:
            for d in self.directions:
                real = self.data[d[1]]
                out.update(self._paired_scores(d, self.mean_images[d[1]].expand_as(real), real, "baseline"))
                if d == self.label_direction:  # the most frequent training class everywhere
                    true = snap_to_palette(real, self.palette)
                    pred = torch.full_like(true, int(self.class_counts.argmax()))
                    scores = segmentation_scores(pred, true, self.num_classes)
                    out.update({f"baseline/{k}_{d}": v for k, v in scores.items()})
        elif "pairs" in self.spec.metric_families:
            for d in self.classifiers:
                out[f"ceiling/classifier_acc_{d}"] = self.judge_accuracy[d]
        else:
            for d in self.directions:
                net = self.classifiers.get(d[1])
                if net is None:
                    continue
                source = match_channels(self.data[d[0]], self.channels[d[1]])
                out[f"baseline/label_acc_{d}"] = accuracy(net, source, self.data[f"label_{d[0]}"])
                out[f"ceiling/label_acc_{d}"] = self.judge_accuracy[d[1]]
                if d in self.realism_judges:
                    out[f"baseline/realism_{d}"] = realism(self.realism_judges[d], self._tinted(d[0]))
                    out[f"ceiling/realism_{d}"] = realism(self.realism_judges[d], self.data[d[1]])
        return out

    # ------------------------------------------------------------------ grids

    def grids(self, nets, n=4, mode=None, min_side=0):
        """{direction: 3×H×W grid} on the same first n eval images every time, in inference `mode`
        (default `self.mode`), of the kinds the model declares (ModelSpec.grid_kinds): a multimodal
        model (BicycleGAN) adds "ab_z" (input | z = 0 | random z ...); a generator of pairs (CoGAN)
        gives "pair" (x_a | x_b for fixed z). `min_side`: tiles enlarged to at least this (`tile`)."""
        mode = self.mode if mode in (None, "auto") else mode
        if "pair" in self.spec.grid_kinds:
            x_a, x_b = self._generate_pairs(nets, n, mode)
            return {"pair": tile([to_rgb(x_a), to_rgb(x_b)], min_side=min_side)}
        grids = {}
        for d in self.directions:  # rows of input | output | reconstruction (two-way models)
            x = self.data[d[0]][:n]
            columns = [x, self._translate(nets, x, d, mode, batch_size=len(x))]  # n rows, one batch
            if d[::-1] in self.directions:
                columns.append(self._translate(nets, columns[1], d[::-1], mode, batch_size=len(x)))
            grids[d] = tile([to_rgb(c) for c in columns], min_side=min_side)
        if "z_samples" in self.spec.grid_kinds and self.diversity_samples:
            x = self.data["a"][:n]
            columns = [x, self._translate(nets, x, "ab", mode), *self._z_samples(nets, x, mode)]
            grids["ab_z"] = tile([to_rgb(c) for c in columns], min_side=min_side)
        return grids

"""Typed experiment configuration: the dataclasses, one field per key, one docstring per field.

    accelerate launch -m facetrain.train --config configs/article.yaml --train.max_steps 500 --optim.lr 3e-4

Every key lives in one dataclass field with a docstring. A YAML file sets any subset of the keys (nested by
section); `--section.key value` on the command line beats the file (`config/load.py`). Unknown keys, wrong
types, unknown names (`config/names.py`), values outside their range (`config/ranges.py`) and impossible
combinations (`config/checks.py`) are rejected with one line naming the key, before torch is imported, any data
is read or a model built. `python -m facetrain.train --help` lists every key (`config/help.py`). The resolved
config is written to the run directory and stored in every checkpoint and bundle. Nothing in config/ imports
torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from facetrain.config.constants import MAX_IMAGE_PIXELS


@dataclass
class AugmentConfig:
    """Training-time augmentation (the article's set). Validation/eval never augment."""

    enabled: bool = True
    """Master switch; false gives deterministic training inputs (resize + normalise only)."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    rotation: float = 15.0
    """Maximum random rotation, degrees (uniform in [-rotation, rotation])."""
    crop_scale_min: float = 0.8
    """RandomResizedCrop: smallest crop area as a fraction of the image."""
    crop_scale_max: float = 1.0
    """RandomResizedCrop: largest crop area as a fraction of the image."""
    brightness: float = 0.2
    """ColorJitter brightness strength (0 = off)."""
    contrast: float = 0.2
    """ColorJitter contrast strength (0 = off)."""
    saturation: float = 0.2
    """ColorJitter saturation strength (0 = off)."""
    hue: float = 0.1
    """ColorJitter hue strength, in [0, 0.5] (0 = off)."""
    grayscale: float = 0.0
    """Probability of converting a training image to 3-channel gray (helps when test data is gray)."""
    native_resolution: bool = True
    """Augment an image smaller than data.image_size at its own size and enlarge it once, in the final crop
    (same augmentations, ~35% less CPU per image for 92x112 faces at 224 px); false enlarges it first."""
    on_device: bool = True
    """source=packed: augment whole uint8 batches on the training device (one affine warp + one colour matrix
    per image, facetrain/data/device_augment.py) instead of per image with PIL in DataLoader workers; other sources
    always use PIL."""


@dataclass
class DataConfig:
    """Where images come from, how identities are split, and how images are preprocessed."""

    source: str = "synthetic"
    """`synthetic` (built-in generated identities, no download), `folder` (root/<identity>/<image>), `hf`
    (Hugging Face datasets: a dataset name, or a local imagefolder via `root`) or `packed` (a pack file made by
    `python -m facetrain.pack`, given as `root`)."""
    root: str = ""
    """Image folder (source=folder), local imagefolder directory (source=hf without hf_name) or pack file
    (source=packed)."""
    hf_name: str = ""
    """Hugging Face dataset name for source=hf (e.g. `user/faces`); empty means `imagefolder` at `root`."""
    hf_split: str = "train"
    """Split of the Hugging Face dataset to read."""
    image_column: str = "image"
    """Column holding the image (source=hf)."""
    label_column: str = "label"
    """Column holding the identity (int or str) (source=hf)."""
    synthetic_identities: int = 100
    """Number of generated identities (source=synthetic)."""
    synthetic_images_per_identity: int = 12
    """Images generated per identity (source=synthetic)."""
    synthetic_seed: int = 0
    """Seed of the synthetic generator: same seed, same people and images."""
    val_fraction: float = 0.2
    """Fraction of identities held out for validation (whole identities, never single images)."""
    val_identities: int = 0
    """If > 0, hold out exactly this many identities instead of val_fraction."""
    split_seed: int = 0
    """Seed of the identity split (independent of the training seed, so runs compare on the same split)."""
    image_size: int = 64
    """Model input side, pixels (square)."""
    mean: list[float] | None = None
    """Normalisation mean per RGB channel; null = the backbone's own pretrained config."""
    std: list[float] | None = None
    """Normalisation std per RGB channel; null = the backbone's own pretrained config."""
    bad_images: str = "error"
    """Pre-flight policy for undecodable/oversized images: `error` (stop and list them) or `skip`."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """Images with more pixels than this are refused as decompression bombs (PIL's own default)."""
    preflight: bool = True
    """Check every image header before training (fast, parallel); false skips the scan."""
    exclude: str = ""
    """Files to leave out (source=folder): an audit.json from `python -m facetrain.audit` (its likely mislabels
    and the smaller identity of each likely duplicate pair) or a text file of image paths relative to `root`, one
    per line; counted and named in preflight.txt and the model card. Empty: none."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training augmentation."""


@dataclass
class ModelConfig:
    """Backbone + embedding head."""

    backbone: str = "tf_efficientnetv2_b0"
    """Any timm model name; its classifier is removed (num_classes=0)."""
    embedding_dim: int = 512
    """Output embedding size; outputs are L2-normalised so a dot product is the cosine score."""
    pretrained: bool = False
    """Start from pretrained weights: timm's hub weights, or `pretrained_file` when given."""
    pretrained_file: str = ""
    """Local weights file (.safetensors/.pth/.bin) for the backbone; works offline."""
    init_from: str = ""
    """A facetrain bundle, checkpoint or run directory whose whole network (backbone and head) this run starts
    from instead of `pretrained`/`pretrained_file`: fine-tune a distilled student on labelled people. Its backbone
    and embedding_dim must equal this config's; the optimizer, schedule and step start fresh. Empty = off."""
    channels_last: bool = True
    """NHWC memory layout: faster convolutions on GPUs and on CPUs with oneDNN."""
    drop_rate: float = 0.0
    """Dropout before the embedding head."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate inside the backbone (where the backbone supports it)."""
    sync_bn: bool = False
    """With several processes: BatchNorm normalises with the statistics of the global batch, not each rank's
    slice (any backend: gloo on CPUs, NCCL on GPUs; two small all-reduces per layer per step), so a step equals
    one process's on the same batch."""
    compile: bool = False
    """Wrap the model in torch.compile (first steps are slow while it compiles)."""
    freeze_bn: bool = False
    """Keep every BatchNorm layer of the backbone at its pretrained running statistics while training (their
    scale/shift still learn): batches of a small, uniform training set would otherwise pull the statistics
    away from what other people's photos need."""
    fold_batchnorm: bool = True
    """At inference (validation, eval, verify, identify): embed with a copy whose BatchNorm layers are folded
    into the convolutions before them: same embeddings (fp32: to ~1e-6), a ~30% faster forward pass on a CPU
    (from 128 images on). Training and the saved weights are unaffected; an architecture where folding would
    change the outputs is left as it is."""
    freeze_stages: int = 0
    """Freeze the first N parameter groups of the backbone (timm's coarse grouping: 1 = the stem, 2 = stem +
    first stage, ...): weights get no gradient and BatchNorm statistics stop updating. -1 freezes the whole
    backbone (only the embedding head trains). Protects generic low-level pretrained features on small data."""


@dataclass
class LossConfig:
    """Metric-learning loss and miner (pytorch-metric-learning), chosen by name."""

    name: str = "triplet"
    """Pair/triplet losses on the batch: `triplet`, `contrastive`, `bce_pair` (the article's binary cross-entropy
    on pairs), `multi_similarity`. Margin-softmax heads with one weight vector per training identity: `arcface`,
    `cosface`, `subcenter_arcface` (ArcFace with `sub_centers` vectors per identity: tolerates label noise)."""
    margin: float | None = None
    """Margin in the loss's own unit; null = its standard value. triplet: cosine-similarity units (0.1);
    arcface / subcenter_arcface: degrees added to the angle (28.6 = 0.5 rad); cosface: subtracted from the
    cosine (0.35)."""
    distance: str = "cosine"
    """`cosine` (similarity) or `euclidean` (L2 distance) for triplet/contrastive."""
    pos_margin: float = 1.0
    """Contrastive: positives are pulled until similarity >= pos_margin (cosine) / distance <= it (L2)."""
    neg_margin: float = 0.0
    """Contrastive: negatives are pushed until similarity <= neg_margin (cosine) / distance >= it (L2)."""
    ms_alpha: float = 2.0
    """Multi-similarity loss alpha (positive weight)."""
    ms_beta: float = 50.0
    """Multi-similarity loss beta (negative weight)."""
    ms_base: float = 0.5
    """Multi-similarity loss base similarity."""
    scale: float = 30.0
    """Logit scale of the margin heads (arcface, cosface, subcenter_arcface) and of bce_pair."""
    sub_centers: int = 3
    """subcenter_arcface: weight vectors per identity (an image is scored against its closest one)."""
    miner: str = "none"
    """`none`, `triplet_all`, `triplet_hard`, `triplet_semihard`, `multi_similarity`."""
    miner_margin: float = 0.2
    """Margin used by the triplet-margin miner."""
    miner_epsilon: float = 0.1
    """Epsilon of the multi-similarity miner."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule, chosen by name."""

    preset: str = ""
    """Optional named pair that sets `name` and `scheduler` together: adam_cosine, adamw_plateau, sgd_step,
    ranger_exponential, schedulefree_adamw, adamw_cosine_warmup."""
    name: str = "adamw"
    """`adam`, `adamw`, `sgd`, `ranger`, `schedulefree_adamw`."""
    lr: float = 1e-3
    """Peak learning rate for the embedding head (and backbone, times backbone_lr_mult)."""
    backbone_lr_mult: float = 1.0
    """Backbone learning rate = lr x this; < 1 protects pretrained features."""
    weight_decay: float = 1e-5
    """Decoupled (AdamW) or L2 (Adam/SGD) weight decay."""
    eps: float = 1e-8
    """Adam epsilon."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    momentum: float = 0.9
    """SGD momentum."""
    fused: bool = True
    """adam, adamw, sgd: torch's fused update (one kernel over all parameters, CPU and GPU) instead of its
    default multi-tensor one; same update rule. tf_efficientnetv2_b0's AdamW step on a 2-core CPU: 4 ms vs 17 ms."""
    scheduler: str = "cosine_warmup"
    """`cosine`, `cosine_warmup`, `plateau`, `step`, `exponential`, `constant`."""
    scheduler_interval: str = "step"
    """Advance the schedule every optimizer `step` or every `epoch` (the article steps per epoch)."""
    warmup_steps: int = 0
    """Linear warm-up length in scheduler intervals (cosine_warmup)."""
    t_max: int = 0
    """Length of the cosine (warm-up included) in scheduler intervals, after which the lr stays at eta_min;
    0 = the whole run."""
    eta_min: float = 1e-6
    """Cosine floor learning rate."""
    step_size: int = 0
    """step: drop the lr by gamma every N scheduler intervals; 0 = a third of the run (lr, lr/10, lr/100)."""
    gamma: float = 0.0
    """step: factor per drop (0 = 0.1); exponential: factor per interval (0 = chosen so the run ends at lr/100)."""
    plateau_patience: int = 2
    """ReduceLROnPlateau: validations without improvement before the lr is cut."""
    plateau_factor: float = 0.5
    """ReduceLROnPlateau: lr multiplier on a plateau."""


@dataclass
class TrainConfig:
    """Loop, batching, precision, logging and checkpointing."""

    output_dir: str = "runs/default"
    """Run directory: config.yaml, TensorBoard logs, checkpoints/, bundle/."""
    batch_size: int = 32
    """Images per process per micro-step; global batch = batch_size x processes (x grad_accum_steps)."""
    m: int = 4
    """Images per identity in a batch (P identities x m images); batch_size must be a multiple of m."""
    max_steps: int = 0
    """Optimizer steps to train; 0 = `epochs` epochs."""
    epochs: int = 8
    """Epochs when max_steps is 0. One epoch ~ every training image once, every identity at least once."""
    grad_accum_steps: int = 1
    """Micro-steps per optimizer step (mining happens within each micro-step's global batch)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 = off."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights (timm ModelEmaV3, with its warm-up: the average
    follows the weights closely in the first steps) with this decay per optimizer step, e.g. 0.998; validation
    and the exported best bundle use the averaged weights, checkpoints keep both. 0 = off."""
    mixed_precision: str = "auto"
    """`auto` (the launcher's setting if any, else bf16 where the hardware supports it), `no`, `fp16`,
    `bf16`."""
    seed: int = 0
    """Seed for weights, sampler order and augmentation."""
    log_every: int = 10
    """Log loss/lr/img/s every N optimizer steps: the hot loop's host syncs (also where skipped non-finite steps
    are reported and, with several processes, stop requests agreed on)."""
    val_every: int = 0
    """Validate every N optimizer steps; 0 = at the end of each epoch."""
    val_metric: str = "auc"
    """Metric that picks the best checkpoint: `auc`, `eer` (lower is better) or a key like `tar@far=1e-02`."""
    val_batch_size: int = 128
    """Images per process per forward pass during validation."""
    ckpt_every: int = 200
    """Write a full training checkpoint every N optimizer steps (and at the end / on a stop request)."""
    keep_last: int = 2
    """Full checkpoints kept (oldest deleted first); the best model is kept separately as a bundle."""
    resume: str = ""
    """`` (fresh; refuses to overwrite a run with checkpoints), `auto` (latest complete checkpoint in
    output_dir, else fresh) or a checkpoint directory."""
    num_workers: int = -1
    """DataLoader worker processes per rank; -1 = from the CPU count and process count."""
    prefetch_factor: int = 2
    """Batches each DataLoader worker prepares ahead of the step (only with num_workers > 0)."""
    progress: bool = True
    """Rich progress bar on the main process."""
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers (accelerate's): `tensorboard` (output_dir/tb), `mlflow`, `wandb`, `trackio`, `aim`,
    `comet_ml`, `clearml`, `dvclive`, `swanlab`, several as a list (`mlflow,tensorboard` on the command line),
    `all` (every one installed) or `[]` / `""` (none); where each stores its data is set its own way (MLflow:
    MLFLOW_TRACKING_URI)."""
    tensorboard: bool = True
    """false: leave TensorBoard out of log_with (the older switch; with the default log_with, no tracker)."""
    max_bad_steps: int = 5
    """Stop the run after this many consecutive steps with a non-finite loss or gradient (each is skipped; with
    a fused optimizer the count is read at the next log step, validation or checkpoint: facetrain/training/guard.py)."""


@dataclass
class DistillConfig:
    """Learn from a face model (a teacher): the student's embedding is pulled towards the teacher's on the same
    augmented view of every training image (function matching). Off while `teacher` is empty."""

    teacher: str = ""
    """The teacher's file (an ONNX face-embedding model or a facetrain bundle); empty = no distillation."""
    teacher_input: str = ""
    """The teacher's input spec, passed as it is to the teacher loader (its size, channel order and scaling);
    empty = what the file itself declares."""
    metric_weight: float = 1.0
    """Weight of the metric loss (`loss.name`) in the total; 0 = distillation alone (labels then only shape the
    P x m batches)."""
    cosine_weight: float = 1.0
    """Weight of the embedding regression: mean of 1 - cos(projected student embedding, teacher embedding)."""
    relational_weight: float = 1.0
    """Weight of the relational term: mean squared difference between the batch's student and teacher cosine
    similarity matrices, off the diagonal, over the global batch."""
    projection: str = "auto"
    """Map from the student's embedding to the teacher's for the regression term: `auto` (a learned linear map
    when their sizes differ, none when equal), `linear` (always learned) or `none` (sizes must be equal). Saved in
    checkpoints; never exported (the bundle holds the student alone)."""
    agreement_images: int = 512
    """Validation: held-out images (the first N) on which val/teacher_agreement, the mean cosine between the
    projected student and the teacher, is measured; their teacher embeddings are computed once. 0 = off."""
    mix: str = "none"
    """Extra views for the distillation terms: `mixup` (a pixel blend) or `cutmix` (a square of one face pasted
    into another) of two of the step's augmented training images of different identities; the teacher embeds
    the mixed image itself (no label needed); the metric loss never sees it. `none` = off."""
    mix_images: int = 0
    """Mixed images added per process to every micro-batch (every step with train.grad_accum_steps 1), in the same
    forward pass as the labelled batch; must be > 0 when `mix` is set, 0 otherwise."""
    mix_alpha: float = 1.0
    """The mix proportion lambda ~ Beta(mix_alpha, mix_alpha): mixup's weight of the first face, cutmix's area
    left to it (the pasted square covers 1 - lambda of the image). 1 = uniform; < 1 favours nearly pure faces."""
    unlabelled: str = ""
    """A folder of face images without identity labels (any nesting, every image file counts), aligned like the
    training data; only the distillation terms see them (the teacher is their label). Empty = none."""
    unlabelled_unsampled: bool = False
    """Also use as unlabelled faces the training images the P x m sampler never draws (identities with fewer than
    train.m images); validation identities never."""
    unlabelled_images: int = 0
    """Unlabelled images added per process to every micro-batch (every step with train.grad_accum_steps 1),
    augmented like the labelled ones and drawn in a seeded order (every image once before any repeats); > 0 needs
    `unlabelled` or `unlabelled_unsampled`."""
    targets: str = "online"
    """Where the teacher's targets come from: `online` (the teacher embeds the student's augmented view of every
    step: function matching) or `cached` (the teacher embeds each training image's fixed, un-augmented view once,
    kept in distill.cache_dir and reused by later runs; no teacher cost per step, but the student may memorise
    the fixed targets instead of learning the teacher's function -- the baseline of docs/recipes.md). With
    `cached`, extra views (mix_images, unlabelled_images) are still embedded by the teacher every step: they have
    no fixed view to cache, so they carry the new targets while the labelled images cost no teacher time."""
    cache_dir: str = ""
    """distill.targets cached: the folder of the teacher-target cache, one file per (teacher file, input spec,
    data.image_size), keyed by each image's content; empty = the user's cache folder ($XDG_CACHE_HOME/facetrain,
    else ~/.cache/facetrain, where galleries are cached too)."""


@dataclass
class DebugConfig:
    """Knobs for tests, audits and benchmarks, kept apart from the training settings; none is needed to train."""

    stop_at_step: int = -1
    """Act as if a stop request arrived after this optimizer step: checkpoint and exit, resumable (-1 = off)."""
    record_samples: bool = False
    """Audit: append each rank's dataset positions per micro-step to output_dir/samples/rank<r>.jsonl."""
    inject_nan_at: int = -1
    """Make the loss NaN at this optimizer step (-1 = never): the non-finite-step guard's test."""
    fail_rank: int = -1
    """Make this rank raise at optimizer step fail_step (-1 = never): the other ranks must then stop promptly."""
    fail_step: int = -1
    """The step at which fail_rank raises."""
    slow_save_s: float = 0.0
    """Sleep this many seconds inside every checkpoint save, after its files and before it is marked complete and
    renamed into place, so that a test can kill the process in the middle of a save."""


@dataclass
class Config:
    """A whole experiment."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


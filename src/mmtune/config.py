"""The one typed configuration schema.

A YAML file, ``--set a.b=c`` overrides on the command line and the Python API all produce a
:class:`Config`. Unknown keys and bad values raise :class:`ConfigError`, which names the key
and what would be valid. A run bundle stores the fully resolved config.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration key is unknown or its value is not valid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(_Strict):
    """One label column of a multitask setup."""

    column: str
    """Column holding this task's label(s)."""
    multilabel: bool = False
    """Several labels per row: a list (JSONL / Parquet) or a ``separator``-joined string."""
    separator: str = "|"
    weight: float = Field(1.0, ge=0.0)
    """This task's weight in the summed loss."""


class DataConfig(_Strict):
    """Where the examples are and which columns hold what."""

    train: Optional[str] = None
    """Training manifest (CSV, TSV, JSONL, JSON or Parquet); image paths are relative to its folder."""
    val: Optional[str] = None
    """Validation manifest; when absent, a stratified, seeded split of ``train``."""
    test: Optional[str] = None
    """Test manifest; when absent and ``test_fraction`` > 0, a stratified split of ``train``."""
    image_column: Optional[str] = "image"
    """Column holding image file paths (None: no image modality)."""
    text_column: Optional[str] = "text"
    """Column holding text (None: no text modality)."""
    label_column: str = "label"
    """Column holding the class label (single task; ignored when ``tasks`` is set)."""
    tasks: Optional[Dict[str, TaskConfig]] = None
    """Several label columns, a head each: ``{task name: {column, multilabel, separator, weight}}``."""
    allow_missing: List[Literal["image", "text"]] = Field(default_factory=list)
    """Modalities a row may lack (empty value); the model masks them and uses a learned placeholder."""
    id_column: Optional[str] = None
    """Column carried through to predictions unchanged."""
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of ``train`` held out for validation when no ``val`` manifest is given."""
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of ``train`` held out for testing when no ``test`` manifest is given (0: none)."""
    split_seed: int = 0
    """Seed of the stratified split."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """``error``: stop with the report of every bad row; ``skip``: go on without them and keep them in the bundle."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes."""


class EncoderConfig(_Strict):
    """One pretrained encoder."""

    modality: Literal["image", "text", "image_text"]
    """What it reads: ``image``, ``text`` or ``image_text`` (a joint encoder such as CLIP)."""
    checkpoint: str
    """A Hugging Face hub id, a local directory saved with ``save_pretrained``, or an offline preset
    (``minilm-l6`` / ``efficientnet-lite0``)."""
    pooling: Literal["auto", "cls", "mean", "max"] = "auto"
    """How token features become one vector (``auto``: the model's own convention)."""
    max_length: int = Field(128, ge=1)
    """Text: maximum number of tokens."""
    image_size: Optional[int] = Field(None, ge=16)
    """Image: input side in pixels (default: the processor's own)."""


FUSIONS = ("concat", "single_stream", "late", "stacking", "cross_attention", "gated")


class FusionConfig(_Strict):
    """How the modalities' features meet."""

    type: Literal["concat", "single_stream", "late", "stacking", "cross_attention", "gated"] = "concat"
    """``concat``: pooled features concatenated, shared MLP. ``single_stream``: all token sequences through one
    transformer, classified from a fusion token. ``late``: a head per modality, logits combined by weights.
    ``stacking``: unimodal classifiers, a meta-classifier on their out-of-fold outputs. ``cross_attention``:
    each modality's tokens attend to the others'. ``gated``: gated multimodal unit."""
    hidden_dims: List[int] = Field(default_factory=lambda: [256])
    """Widths of the shared layers after the fusion (empty: none)."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout inside the fusion."""
    width: int = Field(128, ge=4)
    """Common width modalities are projected to (single_stream, cross_attention, gated, late)."""
    layers: int = Field(2, ge=1)
    """Transformer layers (single_stream)."""
    heads: int = Field(4, ge=1)
    """Attention heads (single_stream, cross_attention); must divide ``width``."""
    late_weights: Literal["learned", "mean"] = "learned"
    """late: combine the per-modality logits with learned weights or a plain mean."""
    stacking_folds: int = Field(5, ge=2)
    """stacking: folds for the out-of-fold predictions the meta-classifier learns from."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "FusionConfig":
        if self.type in ("single_stream", "cross_attention") and self.width % self.heads:
            raise ValueError(f"fusion.heads ({self.heads}) must divide fusion.width ({self.width})")
        return self


class HeadConfig(_Strict):
    """The classifier on top of the fused features."""

    hidden_dims: List[int] = Field(default_factory=list)
    """Hidden layer widths of the head (empty: one linear layer)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout before each layer of the head."""


class ModelConfig(_Strict):
    encoders: Dict[str, EncoderConfig] = Field(default_factory=dict)
    """One entry per encoder, keyed by a name of your choice."""
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    modality_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Training only: chance that a modality of a row is hidden (never all of a row's modalities)."""

    @field_validator("encoders")
    @classmethod
    def _names(cls, v: Dict[str, EncoderConfig]) -> Dict[str, EncoderConfig]:
        for name in v:
            if not name.isidentifier():
                raise ValueError(f"encoder name {name!r} must be a plain identifier (letters, digits, _)")
        return v


class FinetuneConfig(_Strict):
    """How much of each pretrained encoder is trained."""

    strategy: Literal["full", "frozen", "partial", "gradual", "lora", "ia3", "bitfit"] = "full"
    """``full``: everything; ``frozen``: encoders fixed (linear probe; embedding cache); ``partial``: the last
    ``unfreeze_last`` layer groups of each encoder; ``gradual``: ``partial`` at first, one more group every
    ``unfreeze_every`` epochs; ``lora`` / ``ia3``: peft adapters in each encoder; ``bitfit``: encoder biases only.
    Fusion and heads always train."""
    unfreeze_last: int = Field(1, ge=0)
    """partial / gradual: how many of each encoder's deepest layer groups train (at first, for gradual)."""
    unfreeze_every: int = Field(1, ge=1)
    """gradual: epochs between unfreezing one more group."""
    encoder_lr: Optional[float] = Field(None, gt=0.0)
    """Learning rate of encoder parameters (default: ``optim.lr``)."""
    fusion_lr: Optional[float] = Field(None, gt=0.0)
    """Learning rate of the fusion (default: ``optim.lr``)."""
    head_lr: Optional[float] = Field(None, gt=0.0)
    """Learning rate of the heads (default: ``optim.lr``)."""
    layer_decay: Optional[float] = Field(None, gt=0.0, le=1.0)
    """Layer-wise learning-rate decay: each shallower layer group of an encoder gets this factor times the
    rate of the group above it (the deepest group gets ``encoder_lr``)."""
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0.0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Optional[Dict[str, List[str]]] = None
    """lora / ia3: module names to adapt per encoder name (default: chosen per architecture)."""
    cache: bool = True
    """frozen: compute encoder outputs once per dataset and train the epochs over that cache."""
    cache_dir: Optional[str] = None
    """Where the embedding cache lives (default: ``<output_dir>/.cache``)."""


class OptimConfig(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    """L2 (adam, sgd) or decoupled (adamw) weight decay; never applied to biases and norm weights."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """SGD momentum."""


class ScheduleConfig(_Strict):
    name: Literal["constant", "step", "cosine", "plateau"] = "constant"
    """``constant``; ``step``: multiply by ``gamma`` every ``step_epochs``; ``cosine``: linear warmup then
    cosine decay to ``min_lr``; ``plateau``: multiply by ``gamma`` after ``patience`` epochs without improvement."""
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Cosine: share of all optimizer steps spent warming up linearly from 0."""
    step_epochs: int = Field(1, ge=1)
    gamma: float = Field(0.5, gt=0.0, le=1.0)
    patience: int = Field(1, ge=0)
    """Plateau: epochs without improvement of ``trainer.monitor`` before the rate drops."""
    min_lr: float = Field(0.0, ge=0.0)


class TrainerConfig(_Strict):
    max_epochs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    eval_batch_size: Optional[int] = Field(None, ge=1)
    """Batch size for validation, test and prediction (default: ``2 * batch_size``)."""
    precision: Literal["32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "64-true"] = "32-true"
    accumulate_grad_batches: int = Field(1, ge=1)
    gradient_clip_val: Optional[float] = Field(None, gt=0.0)
    seed: int = 0
    epoch_metrics: List[Literal["accuracy", "f1_macro", "balanced_accuracy", "auroc", "precision_macro",
                                "recall_macro"]] = Field(default_factory=lambda: ["accuracy", "f1_macro"])
    """Validation metrics logged every epoch (torchmetrics), as val_acc, val_f1_macro, val_balanced_accuracy,
    val_auroc, val_precision_macro, val_recall_macro (means over tasks; per task too with several tasks)."""
    monitor: Literal["val_loss", "val_acc", "val_f1_macro", "val_balanced_accuracy", "val_auroc",
                     "val_precision_macro", "val_recall_macro"] = "val_loss"
    """Validation metric for early stopping, the best checkpoint and the plateau schedule (mean over tasks;
    for a multi-label task, accuracy is subset accuracy)."""
    restore_best: bool = True
    """At the end, load the weights of the best validation epoch (False: keep the last epoch's)."""
    early_stopping_patience: Optional[int] = Field(3, ge=0)
    """Epochs without improvement before stopping (None: never stop early)."""
    accelerator: str = "auto"
    devices: Union[int, str, List[int]] = "auto"
    strategy: str = "auto"
    """Lightning strategy: ``auto``, ``ddp``, ``fsdp``, ``deepspeed``…"""
    progress_bar: bool = True
    tensorboard: bool = False
    """Also log to TensorBoard (runs/<name>/tensorboard; needs the tensorboard package)."""
    limit_train_batches: Optional[Union[int, float]] = None
    """Debugging aid: train on only this many batches (int) or this share (float) per epoch."""


class ImageAugmentConfig(_Strict):
    """Batch-level image augmentation with kornia, on training batches only."""

    enabled: bool = False
    crop_scale: List[float] = Field(default_factory=lambda: [0.7, 1.0])
    """Random resized crop: the range of the crop's area share (back to the input size)."""
    rotation: float = Field(15.0, ge=0.0, le=180.0)
    """Random rotation up to this many degrees."""
    flip: bool = True
    """Random horizontal flip."""
    color_jitter: float = Field(0.2, ge=0.0, le=1.0)
    """Brightness, contrast and saturation jitter strength (0: off)."""
    randaugment: bool = False
    """Add a RandAugment policy (kornia.augmentation.auto.RandAugment)."""
    randaugment_n: int = Field(2, ge=1)
    randaugment_m: int = Field(9, ge=0, le=30)


class TextAugmentConfig(_Strict):
    """Word-level text augmentation, on training batches only (each a per-word probability)."""

    word_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Delete a word."""
    word_mask: float = Field(0.0, ge=0.0, lt=1.0)
    """Replace a word by the tokenizer's mask (or unknown) token."""
    word_swap: float = Field(0.0, ge=0.0, lt=1.0)
    """Swap a word with its right neighbour."""
    token_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Token level, after tokenisation: hide a token from attention (its attention-mask entry set to 0)."""
    token_mask: float = Field(0.0, ge=0.0, lt=1.0)
    """Token level: replace a token id by the tokenizer's mask (or unknown) token id."""


class AugmentConfig(_Strict):
    image: ImageAugmentConfig = Field(default_factory=ImageAugmentConfig)
    text: TextAugmentConfig = Field(default_factory=TextAugmentConfig)
    mixup_alpha: float = Field(0.0, ge=0.0)
    """Manifold mixup on the fused representation: Beta(alpha, alpha) mixing of rows and targets (0: off)."""


class RegularizationConfig(_Strict):
    l1: float = Field(0.0, ge=0.0)
    """L1 penalty on trainable weight matrices (biases and norms excluded), added to the loss."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """Single-label tasks: label smoothing of the cross-entropy."""


class ImbalanceConfig(_Strict):
    class_weights: Union[Literal["none", "inverse", "effective"], Dict[str, float]] = "none"
    """Loss weights per class: ``inverse`` frequency (N / (C n_c)), ``effective`` number of samples
    ((1 - beta) / (1 - beta^n_c), scaled to sum to C), or ``{class: weight}``. First single-label task."""
    effective_beta: float = Field(0.999, gt=0.0, lt=1.0)
    sampler: bool = False
    """Draw training rows with probability inversely proportional to their class frequency."""
    sample_weight_column: Optional[str] = None
    """Column holding a per-row loss weight (with the sampler too: the sampler balances classes, the loss
    weighs rows, so a row counts w once)."""
    focal_gamma: Optional[float] = Field(None, ge=0.0)
    """Focal loss focusing parameter (None: cross-entropy; 0 equals cross-entropy)."""
    focal_alpha: Optional[float] = Field(None, gt=0.0, lt=1.0)
    """Focal loss, binary tasks only: class 1 weighted by alpha and class 0 by 1 - alpha (a task with more
    classes is refused; use ``class_weights`` there)."""


class GANConfig(_Strict):
    epochs: int = Field(300, ge=1)
    noise_dim: int = Field(32, ge=1)
    hidden: int = Field(256, ge=8)
    lr: float = Field(2e-4, gt=0.0)
    batch_size: int = Field(64, ge=2)
    divergence_patience: int = Field(30, ge=1)
    """Stop when the discriminator wins outright (its loss under 0.05) for this many epochs in a row."""
    r1: float = Field(2.0, ge=0.0)
    """Weight of the R1 gradient penalty on real rows (0: off)."""
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0)
    """Decay of the moving average of the generator's weights that samples are drawn from."""


class SynthesisConfig(_Strict):
    """Synthetic minority rows in the space of the encoders' pooled features (frozen, cached)."""

    method: Literal["none", "smote", "borderline_smote", "gan"] = "none"
    target_ratio: float = Field(1.0, gt=0.0, le=1.0)
    """Bring every smaller class up to this share of the largest class's count."""
    k_neighbors: int = Field(5, ge=1)
    """SMOTE neighbours."""
    gan: GANConfig = Field(default_factory=GANConfig)


class EvaluationConfig(_Strict):
    """What fit computes after training, and the report."""

    temperature_scaling: bool = True
    """Fit a temperature on the validation set (single-label tasks); predict applies it."""
    threshold_goal: Literal["none", "max_f1", "min_precision", "min_recall"] = "none"
    """Binary tasks: tune the decision threshold on validation for this goal (none: argmax)."""
    threshold_value: Optional[float] = Field(None, gt=0.0, le=1.0)
    """The precision or recall to reach with ``min_precision`` / ``min_recall``."""
    modality_contribution: bool = True
    """Test metrics with each modality masked out (no retraining)."""
    baselines: bool = False
    """Also train each modality alone with the same settings and report the fusion gain."""
    report: bool = True
    """Write report.html and the plots at the end of fit."""
    worst_examples: int = Field(12, ge=0)
    """How many of the most confidently misclassified test rows the report shows."""
    calibration_bins: int = Field(15, ge=2)

    @model_validator(mode="after")
    def _value_for_goal(self) -> "EvaluationConfig":
        if self.threshold_goal in ("min_precision", "min_recall") and self.threshold_value is None:
            raise ValueError(f"evaluation.threshold_goal={self.threshold_goal} needs evaluation.threshold_value")
        return self


class Config(_Strict):
    name: str = "run"
    """The run's name: its bundle is ``output_dir/name`` (a plain folder name: no path separators, not empty,
    not ``.`` / ``..``, not starting with ``.``)."""
    output_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    regularization: RegularizationConfig = Field(default_factory=RegularizationConfig)
    imbalance: ImbalanceConfig = Field(default_factory=ImbalanceConfig)
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v.strip() or "/" in v or "\\" in v or "\x00" in v or v.startswith("."):
            raise ValueError(f"run name {v!r} must be a plain folder name: not empty, no '/' or '\\', "
                             "not starting with '.' (so '.' and '..' are refused too)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        mods = {e.modality for e in self.model.encoders.values()}
        needs_image = bool(mods & {"image", "image_text"})
        needs_text = bool(mods & {"text", "image_text"})
        if needs_image and not self.data.image_column:
            raise ValueError("an image encoder is configured but data.image_column is empty")
        if needs_text and not self.data.text_column:
            raise ValueError("a text encoder is configured but data.text_column is empty")
        logged = {"val_loss"} | {"val_acc" if m == "accuracy" else f"val_{m}" for m in self.trainer.epoch_metrics}
        if self.trainer.monitor not in logged:
            raise ValueError(f"trainer.monitor={self.trainer.monitor} is not logged; add it to trainer.epoch_metrics "
                             f"or pick one of {sorted(logged)}")
        if self.model.fusion.type == "late" and self.model.head.hidden_dims:
            raise ValueError("fusion 'late' combines per-modality logits: model.head.hidden_dims must be empty")
        if self.model.fusion.type == "stacking":
            if self.finetune.strategy != "frozen" or not self.finetune.cache:
                raise ValueError("fusion 'stacking' trains on cached encoder outputs: set finetune.strategy=frozen "
                                 "(with finetune.cache=true)")
            if self.model.head.hidden_dims:
                raise ValueError("fusion 'stacking': the head is the linear meta-classifier; model.head.hidden_dims must be empty")
            if self.data.tasks and (len(self.data.tasks) > 1 or any(t.multilabel for t in self.data.tasks.values())):
                raise ValueError("fusion 'stacking' supports one single-label task")
        cached = self.finetune.strategy == "frozen" and self.finetune.cache
        if cached and (self.augment.image.enabled or any(v > 0 for v in self.augment.text.model_dump().values())):
            raise ValueError("input augmentation needs live encoders: with finetune.strategy=frozen set "
                             "finetune.cache=false, or use augment.mixup_alpha (works on cached features)")
        if self.synthesis.method != "none":
            if not cached:
                raise ValueError(f"synthesis.method={self.synthesis.method} works on cached encoder features: "
                                 "set finetune.strategy=frozen (with finetune.cache=true)")
            if self.model.fusion.type not in ("concat", "gated", "late"):
                raise ValueError("synthetic rows have pooled features only: use fusion concat, gated or late")
            if self.data.tasks and len(self.data.tasks) > 1:
                raise ValueError("synthesis supports one single-label task")
        imb, reg = self.imbalance, self.regularization
        if imb.focal_gamma is not None and reg.label_smoothing > 0:
            raise ValueError("regularization.label_smoothing and imbalance.focal_gamma do not combine (the focal "
                             "loss has no smoothed targets): set one of them")
        if imb.focal_alpha is not None and imb.focal_gamma is None:
            raise ValueError("imbalance.focal_alpha is a focal-loss setting: set imbalance.focal_gamma too "
                             "(or use imbalance.class_weights with cross-entropy)")
        if imb.sampler and imb.class_weights != "none":
            raise ValueError("imbalance.sampler and imbalance.class_weights both rebalance classes; together a "
                             "minority row would count about 1/n_c^2: choose one")
        if self.finetune.target_modules:
            unknown = set(self.finetune.target_modules) - set(self.model.encoders)
            if unknown:
                raise ValueError(f"finetune.target_modules names unknown encoder(s) {sorted(unknown)}; "
                                 f"encoders: {sorted(self.model.encoders)}")
        return self

    @property
    def modalities(self) -> List[str]:
        """The modalities the configured encoders read, sorted."""
        out = set()
        for e in self.model.encoders.values():
            out.update(["image", "text"] if e.modality == "image_text" else [e.modality])
        return sorted(out)

    def only_modality(self, modality: str, name: str) -> "Config":
        """The same settings with only the encoders that read ``modality`` alone, named ``name``: the
        unimodal counterpart used by baselines and the demo. Raises ValueError when no encoder reads
        just that modality (a joint encoder such as CLIP has no single-modality counterpart)."""
        keep = {n: e for n, e in self.model.encoders.items() if e.modality == modality}
        if not keep:
            raise ValueError(f"no encoder reads only {modality!r}")
        raw = self.to_dict()
        raw["model"]["encoders"] = {n: e.model_dump(mode="json") for n, e in keep.items()}
        raw["name"] = name
        return load_config(raw)

    @property
    def tasks(self):
        """The tasks (label columns) this config trains: a list of :class:`mmtune.tasks.Task`."""
        from .tasks import tasks_from_config

        return tasks_from_config(self.data)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> Dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Keys a resumed run may change: they do not change the model, the data or how it is optimised.
RESUMABLE_KEYS = ("name", "output_dir", "evaluation", "trainer.max_epochs", "trainer.early_stopping_patience",
                  "trainer.progress_bar", "trainer.tensorboard", "trainer.eval_batch_size", "data.num_workers",
                  "finetune.cache_dir", "trainer.accelerator", "trainer.devices")


def config_differences(before: Mapping[str, Any], after: Mapping[str, Any],
                       ignore: Sequence[str] = ()) -> List[tuple]:
    """``(dotted key, old value, new value)`` for every leaf that differs, outside the ``ignore`` prefixes."""
    out: List[tuple] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if any(key == p or key.startswith(p + ".") for p in ignore):
            return
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
        elif a != b:
            out.append((key, a, b))

    walk(before, after, "")
    return out


# --------------------------------------------------------------------------------------
# loading, overrides, errors that name the key


def load_config(
    source: Union[str, Path, Mapping[str, Any], Config, None] = None,
    overrides: Sequence[str] = (),
) -> Config:
    """Build a :class:`Config` from a YAML file, a mapping or an existing config, then apply
    ``key.path=value`` overrides (values parsed as YAML scalars / lists).

    Relative manifest paths in a YAML file are resolved against the file's folder.
    Raises :class:`ConfigError` naming the offending key and what is valid.
    """
    base_dir: Optional[Path] = None
    if source is None:
        raw: Dict[str, Any] = {}
    elif isinstance(source, Config):
        raw = source.to_dict()
    elif isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        base_dir = path.resolve().parent
    from_file = set(raw["data"]) if base_dir is not None and isinstance(raw.get("data"), dict) else set()
    overridden = {_apply_override(raw, item) for item in overrides}
    cfg = _validate(raw)
    # Relative manifest paths written in a YAML file are relative to the file's folder; paths given as
    # overrides (typed on a command line) are relative to the current directory, as a shell path is.
    for key in ("train", "val", "test"):
        value = getattr(cfg.data, key)
        if value and not Path(value).is_absolute():
            written_in_file = key in from_file and f"data.{key}" not in overridden
            setattr(cfg.data, key, str(base_dir / value) if written_in_file else str(Path(value).resolve()))
    return cfg


def _apply_override(raw: Dict[str, Any], item: str) -> str:
    """Set ``key.path=value`` in ``raw``; returns the dotted key."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value (for example trainer.max_epochs=3)")
    key, value = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = nxt
    node[parts[-1]] = parsed
    return ".".join(parts)


def _validate(raw: Dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            valid = _valid_keys(loc[:-1])
            hint = f"; valid keys there: {', '.join(valid)}" if valid else ""
            lines.append(f"unknown config key '{key}'{hint}")
        elif not loc:  # a check across keys: its message names them
            lines.append(str(err["msg"]).removeprefix("Value error, "))
        elif err["type"] == "literal_error":
            lines.append(f"config key '{key}': {err['msg']} (got {err.get('input')!r})")
        else:
            lines.append(f"config key '{key}': {err['msg']} (got {err.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _valid_keys(loc: List[str]) -> List[str]:
    model: Any = Config
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return []
        if part in fields:
            ann = fields[part].annotation
            model = _model_in(ann)
        else:  # a dict entry (for example model.encoders.<name>)
            model = _dict_value_model(model, loc)
        if model is None:
            return []
    fields = getattr(model, "model_fields", None)
    return sorted(fields) if fields else []


def _model_in(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _dict_value_model(model: Any, loc: List[str]) -> Any:
    return EncoderConfig if model is EncoderConfig or "encoders" in loc else None

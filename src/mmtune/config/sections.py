"""The one typed configuration schema: every section and :class:`Config`, validated with the parts' own tables.

A YAML file, ``--set a.b=c`` overrides on the command line and the Python API all produce a
:class:`Config`. Unknown keys and bad values raise :class:`ConfigError`, which names the key
and what would be valid. A run bundle stores the fully resolved config.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Union

import yaml
from pydantic import (BaseModel, Field, SerializeAsAny, ValidationError, ValidationInfo, create_model,
                      field_validator, model_validator)

from ..modalities import MODALITIES, encoder_modality_names, encoder_reads, is_field
from ..schema import PartConfig, Section
from ..tasks import classifies_single_label
from .migrate import _renamed

_Strict = Section

MAX_NAME_BYTES = 200
"""Longest run name: ``.<name>.overwrite`` and ``.<name>.tune.lock`` must stay within a file name's 255 bytes."""


class ConfigError(ValueError):
    """A configuration key is unknown or its value is not valid."""


class SectionError(ValueError):
    """Errors found inside a part's own config section, each line naming its full key."""

    def __init__(self, lines: List[str]):
        self.lines = lines
        super().__init__("; ".join(lines))


def _tables():
    from ..finetune.strategies import STRATEGIES
    from ..fusion import FUSIONS
    from ..losses import LOSSES

    return {"model.fusion": (FUSIONS, "concat"), "finetune": (STRATEGIES, "full"), "loss": (LOSSES, "cross_entropy")}


def _part(section: str, value: Any, preset: Optional[str] = None) -> PartConfig:
    """Validate a part's section with the Config class of the table entry its ``type`` names (``preset``: the
    config's, named in the advice about a setting of another type)."""
    table, default = _tables()[section]
    if value is None:
        value = {}
    if isinstance(value, PartConfig):
        value = value.model_dump()
    if not isinstance(value, Mapping):
        raise SectionError([f"config key '{section}': must be a mapping with a 'type' (got {value!r})"])
    name = value.get("type", default)
    if name not in table:
        raise SectionError([f"config key '{section}.type': unknown {table.kind} {name!r}; valid: {', '.join(table.names())}"])
    cls = table.get(name).Config
    try:
        return cls.model_validate(dict(value))  # ``type`` stays unset when not given (a preset may choose it)
    except ValidationError as exc:
        lines = _error_lines(exc, [section], cls)
        for err in exc.errors():  # a setting of another type: say whose, and how to choose it
            key = str(err["loc"][-1]) if err["type"] == "extra_forbidden" and len(err["loc"]) == 1 else None
            having = [n for n, entry in table.items() if key and key in entry.Config.model_fields]
            if having:
                chosen = (f"the preset {preset!r} chooses the type only after it has read the table, and keeps its "
                          "other settings for the type you name" if preset else f"without it the type is {name!r}")
                hint = f" ({key!r} is a setting of {', '.join(having)}" + (
                    ")" if "type" in value else f": set {section}.type with it; {chosen})")
                lines = [line + hint if line.startswith(f"unknown config key '{section}.{key}'") else line
                         for line in lines]
        raise SectionError(lines) from None


def _default(section: str):
    return lambda: _part(section, None)


class TaskConfig(_Strict):
    """One label column of a multitask setup."""

    column: str
    """Column holding this task's label(s)."""
    multilabel: bool = False
    """Several labels per row: a list (JSONL / Parquet) or a ``separator``-joined string."""
    regression: bool = False
    """A numeric target: one output, standardised with the training split's mean and standard deviation."""
    regression_loss: Literal["mse", "huber"] = "mse"
    """Regression: squared error, or Huber (``huber_delta``, in standard deviations of the target)."""
    huber_delta: float = Field(1.0, gt=0.0)
    separator: str = "|"
    weight: float = Field(1.0, ge=0.0)
    """This task's weight in the summed loss."""

    @model_validator(mode="after")
    def _one_kind(self) -> "TaskConfig":
        if self.multilabel and self.regression:
            raise ValueError("a task is multilabel or regression, not both")
        return self


class AlignConfig(_Strict):
    """Build the training table by joining tables recorded apart (see ``mmtune align``)."""

    tables: List[str] = Field(min_length=2)
    """Manifests to join; each row of the first is an example (paths relative to the YAML file's folder)."""
    on: Optional[str] = None
    """Key column every table has (rows join only on equal keys)."""
    time: Optional[str] = None
    """Time column: each row takes the nearest row of each other table within ``tolerance``."""
    tolerance: Optional[str] = None
    """Largest time difference that still matches, e.g. ``2s`` (a number for numeric times)."""
    direction: Literal["nearest", "backward", "forward"] = "nearest"

    @model_validator(mode="after")
    def _something_to_join_on(self) -> "AlignConfig":
        if not self.on and not self.time:
            raise ValueError("data.align needs on (a key column) and/or time (a time column)")
        return self


class DataConfig(_Strict):
    """Where the examples are and which columns hold what."""

    train: Optional[str] = None
    """Training manifest (CSV, TSV, JSONL, JSON or Parquet); image paths are relative to its folder."""
    align: Optional[AlignConfig] = None
    """Instead of ``train``: join these tables into the training table."""
    val: Optional[str] = None
    """Validation manifest; when absent, a stratified, seeded split of ``train``."""
    test: Optional[str] = None
    """Test manifest; when absent and ``test_fraction`` > 0, a stratified split of ``train``."""
    columns: Dict[str, Union[str, List[str]]] = Field(default_factory=dict)
    """Modality -> the column holding it (``{image: image_path, text: caption}``); a modality not named
    here is read from the column of its own name (``image``, ``text``). ``tabular`` takes a list of columns
    (numbers and categories)."""
    label_column: str = "label"
    """Column holding the class label (single task; ignored when ``tasks`` is set or for a matcher)."""
    query: Optional[str] = None
    """A matcher (with ``response``): the column of the pair's first side — a text, an image, an audio clip. The
    run learns two towers whose embeddings of a row's query and response agree (``matching``); no label needed."""
    response: Optional[str] = None
    """A matcher: the column of the pair's other side (what a search returns)."""
    match_label: Optional[str] = None
    """A matcher: an optional 1/0 column, whether the row's query and response belong together (rows labelled
    0 are negatives: they anchor no contrastive term, and a pairwise loss learns the pair score). Without it
    every row is a positive pair and the other rows of a batch are its negatives."""
    tasks: Optional[Dict[str, TaskConfig]] = None
    """Several label columns, a head each: ``{task name: {column, multilabel, separator, weight}}``."""
    allow_missing: List[str] = Field(default_factory=list)
    """Modalities a row may lack (empty value); the model masks them and uses a learned placeholder."""
    id_column: Optional[str] = None
    """Column carried through to predictions unchanged."""
    group_column: Optional[str] = None
    """Rows that share a value here share a source (a patient, a speaker, a product photographed twice): every
    split mmtune makes (validation, test, stacking's folds) keeps each group on one side, stratified where it can.
    Never read as a feature."""
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of ``train`` held out for validation when no ``val`` manifest is given."""
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of ``train`` held out for testing when no ``test`` manifest is given (0: none)."""
    split_seed: int = 0
    """Seed of the stratified split."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """``error``: stop with the report of every bad row; ``skip``: go on without them and keep them in the bundle."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes (persistent across epochs; pinned memory when training on a GPU)."""
    bucket_by_length: bool = False
    """Training batches of texts of similar length (less padding computed); each epoch still sees every row
    once, in a seeded order. No effect on cached (frozen) runs."""
    jpeg_draft: bool = True
    """Decode a JPEG at least twice the side its encoder resizes it to at a reduced scale (1/2, 1/4 or 1/8 of its
    size: libjpeg's DCT scaling) that still keeps both sides at least twice that side: a 12-megapixel photograph
    into a 224 px encoder decodes in a third of the time, its resized pixels 0.16/255 from a full decode's on
    average (``bench/decode.py``; docs/guides/configs.md).
    Training, prediction, the server and the embedding cache decode alike (recorded in the bundle; a bundle written
    before this setting decodes in full)."""
    exif_orientation: bool = True
    """Turn each picture upright as its EXIF orientation tag says, as photo viewers show it (a phone photograph taken
    upright is often stored sideways with such a tag); a file without the tag is read as stored. Training,
    prediction, the server and the embedding cache read alike (recorded in the bundle; a bundle written before this
    setting reads the pixels as stored)."""

    @field_validator("columns", "allow_missing")
    @classmethod
    def _modalities(cls, v):
        unknown = [m for m in v if not is_field(m)]
        if unknown:
            raise ValueError(f"unknown modality {unknown[0]!r}; valid: {', '.join(MODALITIES.names())}, or "
                             "<modality>.<name> for another column of one (text.body, image.back)")
        return v

    def column(self, field: str) -> Union[str, List[str]]:
        """The column (or, for a modality of several columns, the list of them) holding ``field``; by default
        the column named like the modality (``text``), or like the suffix of another field (``text.body``: ``body``)."""
        return self.columns.get(field, field.split(".", 1)[1] if "." in field else field)


class EncoderConfig(_Strict):
    """One pretrained encoder."""

    modality: str
    """What it reads: a modality (``image``, ``text``) or a joint encoder's modalities (``image_text``: CLIP)."""
    checkpoint: str
    """A Hugging Face hub id, a local directory saved with ``save_pretrained``, or an offline preset
    (``minilm-l6`` / ``efficientnet-lite0``)."""
    pooling: Literal["auto", "cls", "mean", "max"] = "auto"
    """How token features become one vector (``auto``: the model's own convention)."""
    max_length: int = Field(128, ge=1)
    """Text: maximum number of tokens."""
    image_size: Optional[int] = Field(None, ge=16)
    """Image: input side in pixels (default: the processor's own)."""
    columns: Optional[List[str]] = None
    """Tabular: the columns it reads (default: ``data.columns.tabular``)."""
    types: Optional[Dict[str, Literal["numeric", "categorical"]]] = None
    """Tabular: force a column's type (default: inferred from the training rows, and printed)."""
    dim: Optional[int] = Field(None, ge=2)
    """Tabular: width of each column's token and of the pooled vector (default 32)."""
    max_seconds: float = Field(10.0, gt=0.0)
    """Audio: seconds of each recording the encoder reads (the centre of a longer one; a random window in
    training); shorter ones are padded."""

    fields: Optional[List[str]] = None
    """Several columns of this encoder's modality read by this one encoder (shared weights, a learned
    embedding per column), e.g. ``[text, text.body]``; each is its own input to the fusion."""

    @field_validator("modality")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in encoder_modality_names() and not is_field(v):
            raise ValueError(f"unknown modality {v!r}; valid: {', '.join(encoder_modality_names())}, or "
                             "<modality>.<name> for another column of one (text.body)")
        return v

    @model_validator(mode="after")
    def _fields_of_its_modality(self) -> "EncoderConfig":
        if self.fields is not None:
            wrong = [f for f in self.fields if not is_field(f) or f.split(".", 1)[0] != self.modality]
            if wrong or len(self.fields) < 2 or "." in self.modality:
                raise ValueError(f"encoder fields {self.fields}: two or more columns of its modality "
                                 f"{self.modality!r} (e.g. [{self.modality}, {self.modality}.second])")
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
    fusion: SerializeAsAny[PartConfig] = Field(default_factory=_default("model.fusion"))
    """How the modalities' features meet: ``type`` names an entry of ``mmtune.fusion.FUSIONS`` (concat,
    single_stream, late, stacking, cross_attention, gated, bilinear), the other keys are that fusion's own settings."""
    head: HeadConfig = Field(default_factory=HeadConfig)
    modality_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Training only: chance that a modality of a row is hidden (never all of a row's modalities)."""

    @field_validator("fusion", mode="before")
    @classmethod
    def _fusion(cls, v: Any, info: ValidationInfo) -> PartConfig:
        return _part("model.fusion", v, (info.context or {}).get("preset"))

    @field_validator("encoders")
    @classmethod
    def _names(cls, v: Dict[str, EncoderConfig]) -> Dict[str, EncoderConfig]:
        for name in v:
            if not name.isidentifier():
                raise ValueError(f"encoder name {name!r} must be a plain identifier (letters, digits, _)")
        return v


def _in_table(table_name: str):
    def check(cls, v: str) -> str:
        from .. import optim

        table = getattr(optim, table_name)
        if v not in table:
            raise ValueError(f"unknown {table.kind} {v!r}; valid: {', '.join(table.names())}")
        return v

    return check


class OptimConfig(_Strict):
    name: str = "adamw"
    """An entry of ``mmtune.optim.OPTIMIZERS``: ``adamw``, ``adam``, ``sgd``."""
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    """L2 (adam, sgd) or decoupled (adamw) weight decay; never applied to biases and norm weights."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """SGD momentum."""

    _name = field_validator("name")(classmethod(_in_table("OPTIMIZERS")))


class ScheduleConfig(_Strict):
    name: str = "constant"
    """An entry of ``mmtune.optim.SCHEDULES``. ``constant``; ``step``: multiply by ``gamma`` every ``step_epochs``; ``cosine``: linear warmup then
    cosine decay to ``min_lr``; ``plateau``: multiply by ``gamma`` after ``patience`` epochs without improvement."""
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Cosine: share of all optimizer steps spent warming up linearly from 0."""
    step_epochs: int = Field(1, ge=1)
    gamma: float = Field(0.5, gt=0.0, le=1.0)
    patience: int = Field(1, ge=0)
    """Plateau: epochs without improvement of ``trainer.monitor`` before the rate drops."""
    min_lr: float = Field(0.0, ge=0.0)

    _name = field_validator("name")(classmethod(_in_table("SCHEDULES")))


class TrainerConfig(_Strict):
    max_epochs: int = Field(10, ge=0)
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
    monitor: Literal["val_loss", "val_calibrated_loss", "val_acc", "val_f1_macro", "val_balanced_accuracy", "val_auroc",
                     "val_precision_macro", "val_recall_macro", "val_rmse", "val_r1"] = "val_loss"
    """Validation metric for early stopping, the best checkpoint and the plateau schedule (mean over tasks;
    for a multi-label task, accuracy is subset accuracy; ``val_r1``: a matcher's in-batch recall@1;
    ``val_calibrated_loss``: the single-label tasks' cross-entropy at the temperature that minimises it, which does
    not rise when a model only grows over-confident — what temperature scaling removes after training)."""
    restore_best: bool = True
    """At the end, load the weights of the best validation epoch (False: keep the last epoch's)."""
    average_best: int = Field(1, ge=1)
    """At the end, average the weights of the ``average_best`` best validation epochs (a weight soup, Wortsman et
    al. 2022) instead of taking the best alone; 1: the best epoch alone. Needs ``restore_best``."""
    soup: Literal["uniform", "greedy"] = "uniform"
    """With ``average_best`` > 1: ``uniform`` averages all of them; ``greedy`` adds them best first, each only when
    the validation metric of the average does not get worse."""
    early_stopping_patience: Optional[int] = Field(3, ge=0)
    """Epochs without improvement before stopping (None: never stop early)."""
    accelerator: str = "auto"
    devices: Union[int, str, List[int]] = "auto"
    strategy: str = "auto"
    """Lightning strategy: ``auto``, ``ddp``, ``fsdp``, ``deepspeed``…"""
    num_nodes: int = Field(1, ge=1)
    """Machines of a multi-node run (each with ``devices`` processes)."""
    progress_bar: bool = True
    tensorboard: bool = False
    """Also log to TensorBoard (runs/<name>/tensorboard; needs the tensorboard package)."""
    max_steps: int = Field(-1, ge=-1)
    """Stop after this many optimizer steps (-1: no limit; ``max_epochs`` still applies)."""
    max_time: Optional[Union[str, Dict[str, int]]] = None
    """A wall-clock budget for training: ``DD:HH:MM:SS`` (``00:01:30:00``) or ``{hours: 1, minutes: 30}``;
    training stops at the end of the step that passes it, and the best checkpoint so far is kept."""
    val_check_interval: Optional[Union[int, float]] = None
    """Validate (and checkpoint) every this many training batches (int) or this share of an epoch (float);
    default: once per epoch."""
    limit_train_batches: Optional[Union[int, float]] = None
    """Debugging aid: train on only this many batches (int) or this share (float) per epoch."""
    gradient_checkpointing: bool = False
    """Recompute the encoders' activations in the backward pass instead of keeping them (Hugging Face encoders
    that support it): less memory for large encoders, about a third more compute. Same gradients."""
    compile: Union[bool, str] = False
    """``torch.compile`` the model's forward for training (true: the default inductor backend, or a backend
    name such as ``aot_eager``); the bundle holds the same plain weights."""


AugmentConfig = create_model(
    "AugmentConfig", __base__=Section,
    mixup_alpha=(float, Field(0.0, ge=0.0, description="Manifold mixup on the fused representation: "
                              "Beta(alpha, alpha) mixing of rows and targets (0: off).")),
    **{name: (m.Augment, Field(default_factory=m.Augment)) for name, m in MODALITIES.items() if m.Augment},
)
"""``augment.mixup_alpha`` and one section per modality of the table that has augmentation (``augment.image``,
``augment.text``)."""


class RegularizationConfig(_Strict):
    l1: float = Field(0.0, ge=0.0)
    """L1 penalty on trainable weight matrices (biases and norms excluded), added to the loss."""


class ImbalanceConfig(_Strict):
    class_weights: Union[Literal["none", "inverse", "effective"], Dict[str, float]] = "none"
    """Loss weights per class: ``inverse`` frequency (N / (C n_c)), ``effective`` number of samples
    ((1 - beta) / (1 - beta^n_c), scaled to sum to C), or ``{class: weight}``. First single-label task."""
    effective_beta: float = Field(0.999, gt=0.0, lt=1.0)
    reweight_last: int = Field(0, ge=0)
    """Deferred re-weighting (Cao et al., 2019): the class weights apply only in the last this many epochs of
    ``trainer.max_epochs`` (and never to the validation loss). 0: in every epoch."""
    sampler: bool = False
    """Draw training rows with probability inversely proportional to their class frequency."""
    sample_weight_column: Optional[str] = None
    """Column holding a per-row loss weight (with the sampler too: the sampler balances classes, the loss
    weighs rows, so a row counts w once)."""

    @model_validator(mode="after")
    def _reweighting_has_weights(self) -> "ImbalanceConfig":
        if self.reweight_last and self.class_weights == "none":
            raise ValueError("imbalance.reweight_last defers the class weights, but imbalance.class_weights is none: "
                             "set class_weights (inverse, effective or {class: weight})")
        return self


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
    refuse_far: bool = True
    """Leave out the generated rows of a class whose fidelity is off (its generated centre or spread beyond
    ``FIDELITY_LIMITS``), with a warning naming the class and why; false keeps them, with the warning."""


class SynthesisConfig(_Strict):
    """Synthetic minority rows in the space of the encoders' pooled features (frozen, cached)."""

    method: Literal["none", "smote", "borderline_smote", "gan"] = "none"
    target_ratio: float = Field(1.0, gt=0.0, le=1.0)
    """Bring every smaller class up to this share of the largest class's count."""
    k_neighbors: int = Field(5, ge=1)
    """SMOTE neighbours (fewer, with a warning, when a class has too few rows)."""
    subspace: Optional[float] = Field(None, gt=0.0, le=1.0)
    """Make the rows (GAN or SMOTE) in a whitened PCA subspace of the training features holding this share of
    their variance (e.g. 0.9), then map them back. None: in the full feature space."""
    residuals: bool = True
    """With ``subspace``: give each made row the part outside the subspace of a random real row of its class
    (mapped back alone, made rows are flat in every left-out direction and their class too narrow)."""
    gan: GANConfig = Field(default_factory=GANConfig)

    def needs(self):
        return ([("imblearn", "imbalance", f"synthesis.method={self.method}")]
                if self.method in ("smote", "borderline_smote") else [])


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
    linear_probe: bool = True
    """Also fit a logistic regression on the frozen pretrained encoders' pooled features (from the embedding
    cache, before training) and report its metrics beside the model's: the yardstick fine-tuning must beat."""
    linear_probe_rows: int = Field(50_000, ge=10)
    """The probe fits on at most this many training rows (a seeded sample of a longer training split); it is
    evaluated on every validation and test row."""
    few_shot: List[int] = Field(default_factory=lambda: [5])
    """With the linear probe: also fit, on the same frozen features, heads from only k training rows per class
    (a seeded draw) for each k here — a logistic regression and a nearest-class-mean head — reported beside the
    model (``metrics.json["linear_probe"][task]["few_shot"]``). Empty: none."""
    zero_shot_template: str = "{}"
    """With the linear probe and a joint image–text encoder (CLIP, ``image_text``): classify by the class names
    written through this template (``"a photo of a {}"``), embedded by the pretrained text tower, before any
    training — reported beside the model (``metrics.json["linear_probe"][task]["zero_shot"]``)."""
    baselines: bool = False
    """Also train each modality alone with the same settings and report the fusion gain."""
    report: bool = True
    """Write report.html and the plots at the end of fit."""
    worst_examples: int = Field(12, ge=0)
    """How many of the most confidently misclassified test rows the report shows."""
    explain: int = Field(8, ge=0)
    """Explain this many of the most confidently misclassified test rows into ``explanations/`` (linked from the
    report; needs captum, ``mmtune[explain]``; skipped with a note without it). 0: off."""
    flatter_warning: bool = True
    """Warn when the validation metric lies above the test metric's bootstrap interval (off inside a search's
    trials and cross-validation folds, where the run as a whole says it)."""
    cv: int = Field(0, ge=0)
    """K-fold cross-validation before the fit (``mmtune fit --cv K``): K fits on folds of the training table
    (grouped by ``data.group_column``), their validation metrics and spread in ``metrics.json["cv"]``. 0: off."""
    logit_adjustment: bool = False
    """Post-hoc logit adjustment (Menon et al., 2021) of single-label tasks: after temperature scaling, the
    probabilities are divided by the training prior to a power τ chosen on validation (0 to 2, by balanced
    accuracy), stored with the calibration and applied by every prediction."""
    cv_ensemble: bool = True
    """With ``cv``: ship the K fold models as an equal-weight ensemble (``RUN/ensemble``; together they have seen
    every training row), loaded by ``Predictor.load`` by default; false ships the run's own single model."""
    calibration_bins: int = Field(15, ge=2)

    @model_validator(mode="after")
    def _value_for_goal(self) -> "EvaluationConfig":
        if self.cv == 1:
            raise ValueError("evaluation.cv=1 is not cross-validation: give 0 (off) or at least 2 folds")
        if self.threshold_goal in ("min_precision", "min_recall") and self.threshold_value is None:
            raise ValueError(f"evaluation.threshold_goal={self.threshold_goal} needs evaluation.threshold_value")
        return self

    def needs(self):
        return [("matplotlib", "report", "the report (evaluation.report=true)")] if self.report else []


class MatchingConfig(_Strict):
    """A matcher's towers and loss (used when ``data.query`` and ``data.response`` are set)."""

    dim: int = Field(256, ge=2)
    """Width of the shared embedding space both towers project into."""
    temperature: float = Field(0.07, gt=0.0, le=1.0)
    """Initial temperature of the contrastive loss (CLIP's 0.07)."""
    learn_temperature: bool = True
    """Learn the temperature (in log space, at least 0.01) with the towers."""
    projection: Literal["linear", "none"] = "linear"
    """``linear``: a trained projection per side into ``dim``; ``none``: the encoders' own pooled outputs (both
    sides as wide), as a joint encoder such as CLIP already aligns them — with ``trainer.max_epochs: 0`` its
    zero-shot matcher as it was pretrained."""
    shared_projection: bool = False
    """One projection for both sides (when they are as wide): for two columns of one modality read by one
    encoder (shared weights: ``fields: [text.query, text.answer]``)."""
    pair_weight: float = Field(1.0, ge=0.0)
    """With ``data.match_label``: weight of the pairwise loss beside the contrastive one."""
    hard_negatives: int = Field(0, ge=0)
    """Besides the batch's other rows, each query also meets this many hard negatives: the responses of other
    training rows most similar to it, remembered from earlier steps (the previous epoch's for rows not yet seen in
    this one; near-duplicates of its own response left out). 0: in-batch negatives only."""


class Config(_Strict):
    name: str = "run"
    """The run's name: its bundle is ``output_dir/name`` (a plain folder name: no path separators, not empty,
    not ``.`` / ``..``, not starting with ``.``)."""
    output_dir: str = "runs"
    preset: Optional[str] = None
    """A named recipe (``mmtune.presets.PRESETS``: fast, balanced, best) that fills in the training settings
    this config does not set itself; see the table in docs/guides/presets-and-search.md."""
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    finetune: SerializeAsAny[PartConfig] = Field(default_factory=_default("finetune"))
    """How much of each encoder trains: ``type`` names an entry of ``mmtune.finetune.STRATEGIES`` (full,
    frozen, partial, gradual, bitfit, lora, ia3), the other keys are that strategy's own settings."""
    loss: SerializeAsAny[PartConfig] = Field(default_factory=_default("loss"))
    """The per-task loss: ``type`` names an entry of ``mmtune.losses.LOSSES`` (cross_entropy, focal)."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    regularization: RegularizationConfig = Field(default_factory=RegularizationConfig)
    imbalance: ImbalanceConfig = Field(default_factory=ImbalanceConfig)
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    matching: MatchingConfig = Field(default_factory=MatchingConfig)

    @property
    def task(self) -> str:
        """``matching`` when ``data.query`` / ``data.response`` are set, else ``classification`` (per-row labels or
        targets, :mod:`mmtune.tasks`)."""
        return "matching" if (self.data.query or self.data.response) else "classification"

    @field_validator("finetune", "loss", mode="before")
    @classmethod
    def _parts(cls, v: Any, info: ValidationInfo) -> PartConfig:
        return _part(info.field_name, v, (info.context or {}).get("preset"))

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: Optional[str]) -> Optional[str]:
        from ..presets import PRESETS

        if v is not None and v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; valid: {', '.join(PRESETS.names())}")
        return v

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v.strip() or "/" in v or "\\" in v or "\x00" in v or v.startswith("."):
            raise ValueError(f"run name {v!r} must be a plain folder name: not empty, no '/' or '\\', "
                             "not starting with '.' (so '.' and '..' are refused too)")
        if len(v.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise ValueError(f"run name of {len(v.encode('utf-8', 'surrogatepass'))} bytes is too long: at most "
                             f"{MAX_NAME_BYTES} (the run's lock and staging files add to it, and a file name holds 255)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        """Checks across sections; each asks the parts chosen (their declared constraints)."""
        from ..finetune.strategies import build_strategy
        from ..fusion import FUSIONS, Fusion, fusion_class

        tasks = list((self.data.tasks or {}).values())
        logged = {"val_loss"}
        if self.trainer.max_epochs == 0 and self.task != "matching":
            raise ValueError("trainer.max_epochs=0 trains nothing: it is for a matcher used as pretrained "
                             "(matching.projection=none); give a classifier at least 1 epoch")
        if self.task == "matching":
            self._matching()
            if self.trainer.monitor not in ("val_loss", "val_r1"):
                raise ValueError(f"trainer.monitor={self.trainer.monitor} is not logged by a matcher; pick val_loss "
                                 "or val_r1 (in-batch recall@1)")
            logged.add(self.trainer.monitor)
        elif not tasks or any(not t.regression for t in tasks):
            logged |= {"val_acc" if m == "accuracy" else f"val_{m}" for m in self.trainer.epoch_metrics}
            if classifies_single_label(tasks):
                logged.add("val_calibrated_loss")
        if any(t.regression for t in tasks):
            logged.add("val_rmse")
        if self.trainer.monitor not in logged:
            raise ValueError(f"trainer.monitor={self.trainer.monitor} is not logged; add it to trainer.epoch_metrics "
                             f"or pick one of {sorted(logged)}")
        if self.trainer.average_best > 1 and not self.trainer.restore_best:
            raise ValueError("trainer.average_best > 1 averages the best epochs' weights: it needs trainer.restore_best=true")
        if self.trainer.average_best > 1 and any(k in self.trainer.strategy for k in ("fsdp", "deepspeed")):
            raise ValueError(f"trainer.average_best > 1 is not supported with trainer.strategy={self.trainer.strategy} "
                             "(sharded checkpoints); use ddp or a single device")
        fusion, strategy = fusion_class(self.model.fusion), build_strategy(self.finetune)
        self._tabular_columns()
        from ..encoders.offline import from_scratch

        scratch = [n for n, e in self.model.encoders.items() if from_scratch(e.checkpoint)]
        if scratch and strategy.uses_cache:
            raise ValueError(f"encoder {scratch[0]!r} is trained from scratch, so its outputs change while training and "
                             "cannot be cached: set finetune.cache=false (the other encoders stay frozen)")
        name = self.model.fusion.type
        several = bool(self.data.tasks) and (len(self.data.tasks) > 1 or any(t.multilabel or t.regression
                                                                             for t in self.data.tasks.values()))
        if fusion.linear_head and self.model.head.hidden_dims:
            raise ValueError(f"fusion '{name}' needs a linear head: model.head.hidden_dims must be empty")
        if fusion.needs_cache and not strategy.uses_cache:
            raise ValueError(f"fusion '{name}' trains on cached encoder outputs: set finetune.type=frozen "
                             "(with finetune.cache=true)")
        if fusion.single_task and several:
            raise ValueError(f"fusion '{name}' supports one single-label task")
        augmented = [m for m in MODALITIES if getattr(getattr(self.augment, m, None), "active", False)]
        if strategy.uses_cache and augmented:
            raise ValueError(f"input augmentation needs live encoders (augment.{augmented[0]} is on): with "
                             "finetune.type=frozen set finetune.cache=false, or use augment.mixup_alpha (works on "
                             "cached features)")
        if self.synthesis.method != "none":
            if not strategy.uses_cache:
                raise ValueError(f"synthesis.method={self.synthesis.method} works on cached encoder features: "
                                 "set finetune.type=frozen (with finetune.cache=true)")
            pooled = [n for n, c in FUSIONS.items() if not c.reads_tokens and c.fit_directly is Fusion.fit_directly]
            if name not in pooled:
                raise ValueError(f"synthetic rows have pooled features only: use fusion {', '.join(pooled)}")
            if several:
                raise ValueError("synthesis supports one single-label task")
        imb = self.imbalance
        if self.data.align is not None and self.data.train:
            raise ValueError("data.train and data.align both give the training table: set one of them")
        if imb.sampler and imb.class_weights != "none":
            raise ValueError("imbalance.sampler and imbalance.class_weights both rebalance classes; together a "
                             "minority row would count about 1/n_c^2: choose one")
        targets = getattr(self.finetune, "target_modules", None)
        if targets:
            unknown = set(targets) - set(self.model.encoders)
            if unknown:
                raise ValueError(f"finetune.target_modules names unknown encoder(s) {sorted(unknown)}; "
                                 f"encoders: {sorted(self.model.encoders)}")
        return self

    def _matching(self) -> None:
        """A matcher's columns and the settings that have no meaning for one."""
        d = self.data
        if not d.query or not d.response:
            raise ValueError(f"a matcher needs both data.query and data.response (got query={d.query!r}, "
                             f"response={d.response!r})")
        if d.query == d.response:
            raise ValueError(f"data.query and data.response are both {d.query!r}: a matcher pairs two columns")
        if d.tasks:
            raise ValueError("data.tasks and data.query/response both set: a run is a classifier or a matcher "
                             "(use data.match_label for 1/0 pair labels)")
        if self.model.encoders:
            read = sorted({str(d.column(f)) for f in self.modalities})
            for side in ("query", "response"):
                if getattr(d, side) not in read:
                    raise ValueError(f"data.{side}={getattr(d, side)!r} is read by no encoder; the encoders read "
                                     f"{', '.join(read)} (data.columns maps a modality to its column)")
        if self.augment.mixup_alpha > 0:
            raise ValueError("augment.mixup_alpha mixes labelled rows: a matcher has none (set it to 0)")
        if self.synthesis.method != "none" or self.imbalance.sampler or self.imbalance.class_weights != "none":
            raise ValueError("synthesis and imbalance settings rebalance classes: a matcher has none")
        if self.evaluation.cv:
            raise ValueError("evaluation.cv is not supported for a matcher yet: hold out data.val or data.test")
        if self.preset:
            raise ValueError(f"preset={self.preset} fills in a classifier's recipe: set a matcher's settings directly "
                             "(finetune, matching, optim, trainer)")

    def _tabular_columns(self) -> None:
        """The tabular columns are named once, in ``data.columns.tabular`` or the encoder's ``columns``."""
        for name, e in self.model.encoders.items():
            if e.modality != "tabular":
                continue
            given = self.data.columns.get("tabular")
            if isinstance(given, str):
                given = [given]
            if e.columns is None and given is None:
                raise ValueError(f"the tabular encoder {name!r} needs its columns: set data.columns.tabular "
                                 "(a list of column names)")
            if e.columns is None:
                e.columns = list(given)
            elif given is None:
                self.data.columns = {**self.data.columns, "tabular": list(e.columns)}
            elif list(given) != list(e.columns):
                raise ValueError(f"data.columns.tabular {list(given)} and model.encoders.{name}.columns "
                                 f"{list(e.columns)} differ: name the columns once")

    @property
    def modalities(self) -> List[str]:
        """The modalities the configured encoders read, sorted."""
        return sorted({m for e in self.model.encoders.values() for m in (e.fields or encoder_reads(e.modality))})

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
        return _validate(raw)

    @property
    def tasks(self):
        """The tasks (label columns) this config trains: a list of :class:`mmtune.tasks.Task`."""
        from ..tasks import tasks_from_config

        return tasks_from_config(self.data)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> Dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---- validation, with errors that name the key -----------------------------------------
def _validate(raw: Dict[str, Any]) -> Config:
    renamed = _renamed(raw)
    if renamed:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(renamed))
    try:
        # the preset, for the parts' advice (a part's type is the preset's to choose when the config names none)
        return Config.model_validate(raw, context={"preset": raw.get("preset") if isinstance(raw, dict) else None})
    except ValidationError as exc:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_error_lines(exc, [], Config))) from None


def _error_lines(exc: ValidationError, prefix: List[str], root: Any) -> List[str]:
    lines = []
    for err in exc.errors():
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, SectionError):
            lines.extend(inner.lines)
            continue
        loc = [str(p) for p in err["loc"]]
        key = ".".join(prefix + loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            valid = _valid_keys(loc[:-1], root)
            hint = f"; valid keys there: {', '.join(valid)}" if valid else ""
            lines.append(f"unknown config key '{key}'{hint}")
        elif not loc:  # a check across keys: its message names them
            lines.append(str(err["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"config key '{key}': {str(err['msg']).removeprefix('Value error, ')} (got {err.get('input')!r})")
    return lines


def _valid_keys(loc: List[str], root: Any = None) -> List[str]:
    model: Any = root or Config
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

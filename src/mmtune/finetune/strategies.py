"""Fine-tuning strategies: which encoder parameters train, and what that implies for the run.

Each strategy owns its settings (``finetune`` in the config, chosen by ``type``) and answers the questions
the rest of mmtune asks — does it train any encoder (else the embedding cache may serve), which
parameters train at a given epoch, which callbacks and adapters it needs, whether its checkpoints keep
frozen weights. Fusion and heads always train. :data:`STRATEGIES` is the one list of their names."""
from __future__ import annotations

from typing import Dict, List, Literal, Optional, Tuple

from pydantic import Field
from torch import nn

from ..registry import Registry
from ..schema import PartConfig


class FinetuneConfig(PartConfig):
    """Settings every strategy has: learning rates per part and the cache folder."""

    encoder_lr: Optional[float] = Field(None, gt=0.0)
    """Learning rate of encoder parameters (default: ``optim.lr``)."""
    fusion_lr: Optional[float] = Field(None, gt=0.0)
    """Learning rate of the fusion (default: ``optim.lr``)."""
    head_lr: Optional[float] = Field(None, gt=0.0)
    """Learning rate of the heads (default: ``optim.lr``)."""
    layer_decay: Optional[float] = Field(None, gt=0.0, le=1.0)
    """Layer-wise learning-rate decay: each shallower layer group of an encoder gets this factor times the
    rate of the group above it (the deepest group gets ``encoder_lr``)."""
    cache_dir: Optional[str] = None
    """Where the embedding cache lives (default: ``<output_dir>/.cache``)."""
    probe_epochs: int = Field(0, ge=0)
    """LP-FT (Kumar et al. 2022): the first ``probe_epochs`` epochs train only the fusion and heads, every
    pretrained encoder frozen — a probe of the head — and then the strategy's own encoder training starts, from a
    head that already fits instead of a random one (which distorts the pretrained features less)."""


class Strategy:
    """Base of the strategies. ``apply`` sets ``requires_grad`` on every parameter of a
    MultimodalClassifier; subclasses decide the encoders' part in :meth:`encoder_trainable`."""

    Config: type = FinetuneConfig
    trains_encoders: bool = True
    """False: no encoder parameter ever changes (their outputs can be cached)."""
    keeps_frozen_weights: bool = False
    """Checkpoints and the optimizer hold the encoders' frozen parameters too (they thaw later)."""
    varies_by_epoch: bool = False
    """Which parameters train changes from epoch to epoch (``apply`` is called at each epoch's start)."""
    needs: Tuple[Tuple[str, str, str], ...] = ()
    """Optional packages, as ``(module, extra, feature)``."""

    def __init__(self, cfg):
        self.cfg = cfg
        if getattr(cfg, "probe_epochs", 0):
            if not self.trains_encoders:
                raise ValueError(f"finetune.probe_epochs={cfg.probe_epochs}: strategy {cfg.type!r} trains no encoder, "
                                 "so there is nothing to fine-tune after the probe; use partial, full, lora, …")
            self.varies_by_epoch = True  # the encoders thaw after the probe epochs...
            self.keeps_frozen_weights = True  # ...so the optimizer holds their parameters from the start

    @property
    def uses_cache(self) -> bool:
        """Training reads cached encoder outputs instead of running the encoders."""
        return False

    def prepare(self, model: nn.Module) -> None:
        """Change the model before training (insert adapters)."""

    def encoder_trainable(self, enc: nn.Module, epoch: int) -> None:
        """Set ``requires_grad`` on ``enc``'s parameters (all True on entry)."""

    def apply(self, model: nn.Module, epoch: int = 0) -> None:
        """Set ``requires_grad`` on every parameter for ``epoch`` (counted from 0)."""
        for p in model.parameters():
            p.requires_grad_(True)
        for enc in model.encoders.values():
            if getattr(enc, "from_scratch", False):  # nothing pretrained to keep: it always trains
                continue
            self.encoder_trainable(enc, epoch)
            if epoch < getattr(self.cfg, "probe_epochs", 0):  # LP-FT: the head first
                for p in enc.parameters():
                    p.requires_grad_(False)
            for p in never_trained(enc):
                p.requires_grad_(False)
            if getattr(model.fusion, "reads_tokens", False):
                for p in enc.pooled_only_parameters():
                    p.requires_grad_(False)

    def finish(self, model: nn.Module) -> None:
        """After training: bring the model back to its plain architecture (merge adapters)."""


STRATEGIES: Registry = Registry("fine-tuning strategy")
"""Strategy name (``finetune.type``) -> Strategy class."""


@STRATEGIES.register("full")
class Full(Strategy):
    """Everything trains."""

    class Config(FinetuneConfig):
        type: Literal["full"] = "full"


@STRATEGIES.register("frozen")
class Frozen(Strategy):
    """Encoders fixed (a linear probe with the head); with ``cache``, their outputs are computed once."""

    trains_encoders = False

    class Config(FinetuneConfig):
        type: Literal["frozen"] = "frozen"
        cache: bool = True
        """Compute encoder outputs once per dataset and train the epochs over that cache."""
        cache_dtype: Literal["float16", "float32"] = "float16"
        """How token sequences are stored in the cache (pooled outputs are always float32): float16 halves the
        disk and page-cache footprint; a shard with a value beyond float16's range is kept in float32."""

    @property
    def uses_cache(self) -> bool:
        return self.cfg.cache

    def encoder_trainable(self, enc, epoch):
        for p in enc.parameters():
            p.requires_grad_(False)


@STRATEGIES.register("partial")
class Partial(Strategy):
    """The deepest ``unfreeze_last`` layer groups of each encoder (``Encoder.layer_groups()``) train."""

    class Config(FinetuneConfig):
        type: Literal["partial"] = "partial"
        unfreeze_last: int = Field(1, ge=0)
        """How many of each encoder's deepest layer groups train."""

    def unfrozen_groups(self, epoch: int, n_groups: int) -> int:
        return min(self.cfg.unfreeze_last, n_groups)

    def encoder_trainable(self, enc, epoch):
        groups = enc.layer_groups()
        n = self.unfrozen_groups(epoch, len(groups))
        for i, g in enumerate(groups):
            for p in g:
                p.requires_grad_(i >= len(groups) - n)


@STRATEGIES.register("gradual")
class Gradual(Partial):
    """``partial`` at first, then one more layer group every ``unfreeze_every`` epochs."""

    keeps_frozen_weights = True
    varies_by_epoch = True

    class Config(FinetuneConfig):
        type: Literal["gradual"] = "gradual"
        unfreeze_last: int = Field(1, ge=0)
        """How many of each encoder's deepest layer groups train at first."""
        unfreeze_every: int = Field(1, ge=1)
        """Epochs between unfreezing one more group."""

    def unfrozen_groups(self, epoch: int, n_groups: int) -> int:
        return min(self.cfg.unfreeze_last + epoch // self.cfg.unfreeze_every, n_groups)



@STRATEGIES.register("bitfit")
class BitFit(Strategy):
    """Encoder biases only."""

    class Config(FinetuneConfig):
        type: Literal["bitfit"] = "bitfit"

    def encoder_trainable(self, enc, epoch):
        for name, p in enc.named_parameters():
            p.requires_grad_(name.endswith("bias"))


class Adapters(Strategy):
    """peft adapters in each encoder; only they train, and they are merged into the weights afterwards."""

    needs = (("peft", "lora", "adapter fine-tuning (finetune.type lora / ia3)"),)

    def prepare(self, model):
        from .lora import add_adapters

        self.counts = add_adapters(model, self.cfg)

    def encoder_trainable(self, enc, epoch):
        from .lora import adapter_parameter_names

        names = adapter_parameter_names(enc)
        if not names:
            raise ValueError(f"strategy {self.cfg.type!r}: encoder has no adapters; call add_adapters first")
        for name, p in enc.named_parameters():
            p.requires_grad_(name in names)

    def finish(self, model):
        from .lora import merge_adapters

        merge_adapters(model)


@STRATEGIES.register("lora")
class LoRA(Adapters):
    class Config(FinetuneConfig):
        type: Literal["lora"] = "lora"
        r: int = Field(8, ge=1)
        """Rank of the low-rank update."""
        alpha: float = Field(16.0, gt=0.0)
        """Scale of the update (alpha / r)."""
        dropout: float = Field(0.0, ge=0.0, lt=1.0)
        target_modules: Optional[Dict[str, List[str]]] = None
        """Module names to adapt per encoder name (default: chosen per architecture)."""


@STRATEGIES.register("ia3")
class IA3(Adapters):
    class Config(FinetuneConfig):
        type: Literal["ia3"] = "ia3"
        target_modules: Optional[Dict[str, List[str]]] = None
        """Module names to adapt per encoder name (default: chosen per architecture)."""


def build_strategy(cfg) -> Strategy:
    """The Strategy object for a ``finetune`` config section."""
    return STRATEGIES.get(cfg.type)(cfg)


def apply_strategy(model: nn.Module, cfg, epoch: int = 0) -> None:
    """Set ``requires_grad`` on every parameter of ``model`` as the ``finetune`` section ``cfg`` says."""
    build_strategy(cfg).apply(model, epoch)


def never_trained(enc: nn.Module):
    """Parameters that take no part in classification (CLIP's contrastive temperature)."""
    host = getattr(enc, "model", None)
    scale = getattr(host, "logit_scale", None)
    return [scale] if isinstance(scale, nn.Parameter) else []


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

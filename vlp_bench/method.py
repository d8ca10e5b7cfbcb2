"""The interface every method implements, and the frozen-LLM mechanics they share.

The trainer and the tasks only ever call:
    stages(total_steps)             -> the training stages (one by default; BLIP-2 has two)
    trainable_parameters(stage)     -> what the optimizer of that stage updates
    training_loss(batch, stage)     -> StepOutput(loss, tokens_to_llm)
    generate(images, prompts, dec)  -> one string per image (captioning, VQA)
`images` is (B, 3, H, W), or (B, T, 3, H, W) clips for video tasks: a method whose `video` is true
takes both (the default `encode` averages the frozen encoder's tokens over the frames).
    set_progress(fraction), info()  -> optional: step curricula; facts for results.json
    decoder_stage()                 -> optional: a short stage trained on a copy of the weights
                                       before each evaluation (the text-side family's AR fine-tuning)
    task_stage(steps, total_steps)  -> what a task's fine-tuning trains (tasks.NAME.finetune_steps)
    generation_loss(batch, stage)   -> optional: the teacher-forced loss of the batch's captions
                                       through the generation path (the validation loss)
A batch is {"images", "prompt", "captions", ...}: "prompt" is one string for every row, or a list
of one per row (a task's fine-tuning: a question each); the loss is on the captions (the targets)
and their EOS only, never on a prompt.
A method is a small file in methods/ with a `Config` dataclass and, for the frozen-LLM family, a
`bridge(visual_tokens) -> soft prompt` (its output length may be anything: merging shrinks it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from vlp_bench.backbones import Backbones
from vlp_bench.nn.generation import DecodingConfig, generate_from_prefix, lm_rows, prefix_lm_loss


@dataclass
class Stage:
    name: str
    steps: int


@dataclass
class StepOutput:
    loss: torch.Tensor
    tokens_to_llm: int  # visual (soft prompt) tokens per sample that reached the LLM in this step
    # what `loss` is a mean over (e.g. its target tokens); None = the batch's samples. Data-parallel
    # training weights each rank's loss by it, so N processes average to the one-process mean.
    weight: float | None = None


class Method(nn.Module):
    name: ClassVar[str]  # set by the registry
    Config: ClassVar[type]
    paper_config: ClassVar[object | None] = None  # the config at its paper's scale (`vlp-bench flops --preset paper`)
    # `vlp-bench search`'s default space over Config fields: {field: [choices] | {low, high[, log]}}
    search_space: ClassVar[dict | None] = None
    # search parameters that are not Config fields but that search_values() turns into settings (names,
    # or prefixes ending in "_"): a space naming anything else fails before any work
    search_derived: ClassVar[tuple[str, ...]] = ()
    # takes clips (B, T, 3, H, W) as well as images: the default encode() reads each frame and
    # averages the tokens over the frames (the frame-average baseline of video captioning). False
    # for changes to the encoder whose tokens differ from frame to frame (merged or dropped patches).
    video: ClassVar[bool] = True
    # modules inside the frozen encoder train (simvlg-video's temporal attention): the backward then
    # runs through the encoder to reach them, and its FLOPs are counted (tests/test_flops.py)
    trains_encoder: ClassVar[bool] = False
    # the bridge reads the encoder's tokens as a whole patch grid (pooling by position): a vision
    # side that drops patches (FLIP) cannot feed it
    needs_patch_grid: ClassVar[bool] = False
    # a composition "bridge+side" (compose()): its parts' names; None for a method of its own
    parts: ClassVar[tuple[str, str] | None] = None
    # the fine-tuning steps on a task's training split before it is evaluated, where the task's
    # `finetune_steps` is -1 (its default): 0 = zero-shot, as the frozen-LLM papers evaluate VQA
    task_finetune_steps: ClassVar[int] = 0

    @classmethod
    def configured_from(cls, configs: dict) -> dict:
        """The values this method's [methods.NAME] table is laid over, given the methods' resolved
        configs so far: {} (its Config's defaults); a composition starts from its parts' as configured."""
        return {}

    @classmethod
    def search_values(cls, params: dict, cfg, backbones: Backbones) -> dict:
        """`vlp-bench search`: a trial's sampled parameters -> this method's config values. Taken as
        they are by default; a method whose space has derived parameters (SimVLG's schedule grammar)
        reads them here. `cfg`: the method's configured settings the trial starts from."""
        return dict(params)

    @classmethod
    def search_start_points(cls, cfg, backbones: Backbones, space: dict) -> list[dict]:
        """`vlp-bench search`: points of `space` every study tries first (e.g. its paper's setting)."""
        return []

    def __init__(self, cfg, backbones: Backbones):
        super().__init__()
        self.cfg = cfg
        self.vision = backbones.vision  # frozen
        self.llm = backbones.llm  # frozen
        self.tokenizer = backbones.tokenizer

    @classmethod
    def check(cls, cfg, backbones: Backbones) -> None:
        """Raise ValueError if `cfg` cannot work with these backbones (run before any training)."""

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision.eval()  # frozen parts never leave eval mode (no dropout)
        self.llm.eval()
        return self

    def encode(self, images: torch.Tensor, stage: Stage | None = None) -> torch.Tensor:
        """The frozen encoder's tokens (B, N, vision_dim) for a training stage, or for evaluation
        (stage None); clips are read frame by frame and averaged. Vision-side methods
        (`VisionSide`) change what runs here."""
        with torch.no_grad():
            return frame_average(self.vision, images)

    def visual_tokens(self, batch: dict, stage: Stage) -> torch.Tensor:
        """The encoder's tokens of a training batch: those the feature cache put in it
        (`data.feature_cache`: batch["visual"], for a method whose encode() is the frozen default),
        else encode(batch["images"], stage)."""
        return batch["visual"] if "visual" in batch else self.encode(batch["images"], stage)

    def stages(self, total_steps: int) -> list[Stage]:
        return [Stage("train", total_steps)]

    def trainable_parameters(self, stage: Stage) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def lr_scale(self, name: str) -> float:
        """The learning-rate multiplier of parameter `name` (as named_parameters() names it): 1
        unless the method's reference trains some parts faster (the text-side family: new layers
        and heads at 5x). The trainer gives each multiplier its own optimizer parameter group."""
        return 1.0

    def training_loss(self, batch: dict, stage: Stage) -> StepOutput:
        raise NotImplementedError

    def decoder_stage(self) -> Stage | None:
        """A stage trained before every evaluation on a copy of the weights, which are put back
        afterwards (vlp_bench.train.trainer.finetune); its cost is recorded apart. None = none."""
        return None

    def task_stage(self, steps: int, total_steps: int) -> Stage:
        """The stage a task's fine-tuning trains for `steps` steps, on a copy of the weights
        (vlp_bench.train.trainer.finetune): the decoder stage where the method has one (the stream
        that decodes), else the last stage of its `total_steps` pre-training (frozen-LLM methods:
        the bridge, with the LLM frozen), each with its own parameters and training_loss."""
        stage = self.decoder_stage() or self.stages(total_steps)[-1]
        return Stage(stage.name, steps)

    def generation_loss(self, batch: dict, stage: Stage) -> StepOutput | None:
        """The teacher-forced loss of batch["captions"] after batch["prompt"] through the model that
        generates this method's answers, as it stands during training `stage` (evaluation's
        encoder path: no masking); None when that stage has no generation path yet. The validation
        loss (vlp_bench.train.validation) reads it, in eval mode and without gradients."""
        return None

    def set_progress(self, fraction: float) -> None:
        """Called by the trainer before each step with the fraction of training done (curricula)."""

    def info(self) -> dict:
        """Method-specific facts for results.json (`method_info`), e.g. per-layer token counts."""
        return {}

    def flop_parts(self) -> tuple[dict[str, nn.Module], str]:
        """The FLOP breakdown's parts (vlp_bench.train.flops): the frozen encoders; all else is the bridge."""
        return {"vision": self.vision, "llm": self.llm}, "bridge"

    def shape_key(self, batch: dict, stage: Stage):
        """A hashable value that, with the image tensor's shape, fixes every tensor shape of
        training_loss(batch, stage): the trainer counts a step's FLOPs once per distinct key and
        reuses the count. None, the default, counts every step (exact, but each count is an extra
        forward and backward). tests/test_flops.py checks every registered method's key."""
        return None

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompts: list[str], dec: DecodingConfig) -> list[str]:
        raise NotImplementedError


class FrozenLLMMethod(Method):
    """frozen vision encoder -> trainable bridge -> soft prompt -> frozen causal LLM."""

    def bridge(self, visual: torch.Tensor) -> torch.Tensor:
        """(B, N, vision_dim) -> (B, P, llm_dim)."""
        raise NotImplementedError

    @classmethod
    def input_tokens(cls, cfg, vision) -> int:
        """Tokens per image that encode() hands the bridge at evaluation (vision sides change it)."""
        return vision.num_tokens

    def visual_prefix(self, images: torch.Tensor, stage: Stage | None = None) -> torch.Tensor:
        return self.bridge(self.encode(images, stage))

    def shape_key(self, batch: dict, stage: Stage):
        _, rows = lm_rows(self.tokenizer, batch["prompt"], batch["captions"])
        return max(map(len, rows))  # the padded text length; the bridge's output length is fixed

    def training_loss(self, batch: dict, stage: Stage) -> StepOutput:
        prefix = self.bridge(self.visual_tokens(batch, stage))
        loss, n = prefix_lm_loss(self.llm, self.tokenizer, prefix, batch["prompt"], batch["captions"])
        return StepOutput(loss, prefix.shape[1], weight=n)

    def generation_loss(self, batch: dict, stage: Stage) -> StepOutput | None:
        prefix = self.visual_prefix(batch["images"])  # evaluation's path (stage None)
        loss, n = prefix_lm_loss(self.llm, self.tokenizer, prefix, batch["prompt"], batch["captions"])
        return StepOutput(loss, prefix.shape[1], weight=n)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompts: list[str], dec: DecodingConfig) -> list[str]:
        return generate_from_prefix(self.llm, self.tokenizer, self.visual_prefix(images), prompts, dec)


class VisionSide(FrozenLLMMethod):
    """A change to what the frozen encoder does (ToMe inside the ViT, FLIP's masking), written as
    a mixin over `encode`, so it stacks onto any bridge method: `compose()` builds "bridge+side".
    A side defines `Options` (a dataclass of its own settings) and may override `encode`,
    `input_tokens`, `stages`, `check` (calling super()) and `info` (adding to super().info())."""

    Options: ClassVar[type]


def compose(name: str, bridge: type, side: type, defaults: dict) -> type:
    """The method `name` = bridge method + vision side: the side's encode in front of the bridge's
    bridge, one config holding both parts' settings; `defaults`: the pair's own settings where they
    differ from its parts' (registered with it, e.g. a smaller merge rate)."""
    if not (isinstance(bridge, type) and issubclass(bridge, FrozenLLMMethod)) or issubclass(bridge, VisionSide):
        raise ValueError(f"'{name}': the first part must be a frozen-LLM bridge method (e.g. baseline, simvlg, "
                         f"blip2), not '{bridge.name}'")
    options = getattr(side, "Options", None)
    if options is None or not issubclass(side, FrozenLLMMethod):
        raise ValueError(f"'{name}': '{side.name}' is not a vision-side method that can be stacked onto a bridge")
    types = {f.name: f.type for c in (options, bridge.Config) for f in dataclasses.fields(c)}
    config = dataclasses.make_dataclass(f"{bridge.Config.__name__}_{options.__name__}",
                                        [(k, types[k], dataclasses.field(default=v)) for k, v in defaults.items()],
                                        bases=(options, bridge.Config))
    side_mixin = next(c for c in side.__mro__ if VisionSide in c.__bases__)  # the side without its bridge
    paper = None
    if bridge.paper_config is not None and side.paper_config is not None:  # each part at its paper scale
        own = {f.name for f in dataclasses.fields(options)}
        paper = config(**{**dataclasses.asdict(bridge.paper_config),
                          **{k: v for k, v in dataclasses.asdict(side.paper_config).items() if k in own}})
    doc = f"{bridge.name} + {side.name}: {(side_mixin.__doc__ or '').strip().splitlines()[0]}"

    def configured_from(cls, configs: dict) -> dict:  # the side's options, the bridge's settings, the pair's own
        own = {f.name for f in dataclasses.fields(options)}
        return {**{k: v for k, v in dataclasses.asdict(configs[side.name]).items() if k in own},
                **dataclasses.asdict(configs[bridge.name]), **defaults}

    return type(name.replace("+", "_").replace("-", "_"), (side_mixin, bridge),
                {"Config": config, "paper_config": paper, "__doc__": doc, "parts": (bridge.name, side.name),
                 "configured_from": classmethod(configured_from)})


def frame_average(encoder, images: torch.Tensor) -> torch.Tensor:
    """encoder(images) for (B, 3, H, W); for clips (B, T, 3, H, W) the frames go through as one
    batch of B * T images and their tokens are averaged over the T frames: (B, N, D) either way."""
    if images.ndim != 5:
        return encoder(images)
    B, T = images.shape[:2]
    return encoder(images.flatten(0, 1)).unflatten(0, (B, T)).mean(dim=1)

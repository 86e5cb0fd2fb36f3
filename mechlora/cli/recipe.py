"""The LoRA recipe's options, shared by `mechlora train` and `mechlora compare` (their defaults
are `TrainConfig`'s, the published recipe)."""

from __future__ import annotations

from typing import Annotated

import typer

R = Annotated[int, typer.Option("--r", help="LoRA rank.")]
Alpha = Annotated[int, typer.Option(help="LoRA alpha.")]
Dropout = Annotated[float, typer.Option(help="LoRA dropout.")]
Modules = Annotated[str, typer.Option(help="Projections to adapt, comma separated.")]
Lr = Annotated[float, typer.Option(help="Peak learning rate (AdamW).")]
BatchSize = Annotated[int, typer.Option(help="Pairs per accumulation step.")]
GradAccum = Annotated[int, typer.Option(help="Accumulation steps per update.")]
MicroBatch = Annotated[int, typer.Option(
    help="Pairs per forward (memory bound); 0: all pairs of an update at once. Same gradient "
    "either way; halved by itself after an out-of-memory error.")]
Epochs = Annotated[int, typer.Option(help="Epochs (one random pair per group each).")]
MaxSteps = Annotated[int, typer.Option(help="Stop after this many updates (0: no cap).")]
Warmup = Annotated[int, typer.Option(help="Warmup updates.")]
Schedule = Annotated[str, typer.Option(help="linear | cosine | constant.")]
WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay.")]
MaxGradNorm = Annotated[float, typer.Option(help="Gradient clipping (0: none).")]
KlWeight = Annotated[float, typer.Option(help="Weight of the symmetric KL term.")]
KlTemperature = Annotated[float, typer.Option(help="Softmax temperature of the KL.")]
KlOver = Annotated[str, typer.Option(
    help="vocab (full vocabulary) | choices (the choices' first tokens, renormalised).")]
MergeVariants = Annotated[bool, typer.Option(
    help="Read each choice as all its case and leading-space variants (' yes', 'Yes', ...): "
    "CE on their summed probability (docs/train.md).")]
SaveEvery = Annotated[int, typer.Option(help="Checkpoint every N updates (0: never).")]
GradientCheckpointing = Annotated[bool, typer.Option(
    help="Recompute activations in the backward (on a GPU, turned on by itself when the "
    "estimated peak memory would not fit).")]
Bf16 = Annotated[bool, typer.Option(help="bf16 autocast on GPU.")]

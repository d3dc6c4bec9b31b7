"""Training configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import Config, opt
from ..errors import ConfigError


@dataclass(frozen=True)
class TrainConfig(Config):
    """Everything that determines a training run (and so its resume)."""

    model: str = opt("resnet20", "model name (see `sparseforge info`)")
    dataset: Literal["synthetic", "cifar10", "cifar100"] = opt("synthetic", "dataset name")
    data_dir: str = opt("", "directory of the CIFAR python batches, or a JPEG archive (.npz, e.g. cifar10-jpeg.npz); "
                            "not needed for synthetic")
    normalize: Literal["auto", "imagenet", "cifar10", "cifar100", "half"] = opt(
        "auto", "input normalisation; auto = imagenet for CIFAR (what the shared pretrained weights expect), half for synthetic")
    weights: str = opt("", "initial weights (.safetensors, .pt/.th, or a run directory); empty = random init")
    epochs: int = opt(10, "number of epochs", min=1)
    batch_size: int = opt(128, "batch size (global)", min=1)
    optimizer: Literal["sgd", "adam", "adamw"] = opt("sgd", "optimizer")
    lr: float = opt(0.1, "peak learning rate", min=0.0)
    momentum: float = opt(0.9, "SGD momentum", min=0.0, max=1.0)
    nesterov: bool = opt(True, "Nesterov momentum (SGD)")
    weight_decay: float = opt(5e-4, "weight decay", min=0.0)
    schedule: Literal["cosine", "step", "onecycle", "constant"] = opt("cosine", "LR schedule")
    warmup_epochs: float = opt(0.0, "linear warm-up epochs (cosine/step/constant)", min=0.0)
    milestones: tuple[float, ...] = opt((0.5, 0.75), "step schedule: fractions of training where LR *= gamma")
    gamma: float = opt(0.1, "step schedule decay factor", min=0.0)
    label_smoothing: float = opt(0.0, "label smoothing", min=0.0, max=1.0)
    augment: bool = opt(True, "random crop (pad 4) + horizontal flip")
    channels_last: bool = opt(True, "NHWC memory format (measured faster for CIFAR ResNet-20 training on 2 cores: "
                                    "bench/train_throughput.py)")
    precision: Literal["fp32", "bf16"] = opt(
        "fp32", "training arithmetic: bf16 = autocast the forward (and a teacher's) to bfloat16, weights, gradients and "
                "optimizer state stay fp32, evaluation stays fp32; 2x faster per step on CPUs with AMX / AVX512-BF16 "
                "(bench/train_throughput.py --model resnet56), slower than fp32 on CPUs without them")
    compile: bool = opt(False, "torch.compile the model for training")
    sync_bn: bool = opt(False, "under torchrun: BatchNorm statistics of the global batch (all ranks), so k processes "
                               "train as one process on the same global batch would; off: per-rank statistics")
    device: str = opt("auto", "where training runs: auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda, "
                              "cuda:N. Only the training loop runs there: the model comes back to where it was "
                              "(pruning, surgery and the compiler work on the CPU copy)")
    seed: int = opt(0, "random seed (init, data order, augmentation)")
    threads: int = opt(0, "intra-op threads (0 = PyTorch default)", min=0)
    eval_every: int = opt(1, "evaluate every N epochs (0 = only at the end)", min=0)
    checkpoint_every: int = opt(0, "also checkpoint every N steps inside an epoch (0 = epoch ends only)", min=0)
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep", min=1)
    max_steps_per_epoch: int = opt(0, "cap batches per epoch (0 = full epoch); for quick runs", min=0)
    train_size: int = opt(10000, "synthetic: training images", min=10)
    test_size: int = opt(2000, "synthetic: test images", min=10)

    def validate(self) -> None:
        if self.dataset != "synthetic" and not self.data_dir:
            raise ConfigError(f"TrainConfig.data_dir: dataset {self.dataset!r} needs data_dir (pass --data-dir DIR)")
        if not (self.device in ("auto", "cpu", "cuda") or
                (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ConfigError(f"TrainConfig.device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        if any(not 0 < m < 1 for m in self.milestones):
            raise ConfigError("TrainConfig.milestones: each must be a fraction in (0, 1), e.g. [0.5, 0.75]")

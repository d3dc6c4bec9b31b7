"""Run under torchrun (or plainly, as the 1-process reference): prune on rank 0, broadcast, train a few steps."""

import sys
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

import sparseforge as sf
from sparseforge.api import loaders_for
from sparseforge.data import make_synthetic
from sparseforge.distributed import broadcast_model, init_from_env, rank_world
from sparseforge.train import TrainConfig, Trainer


class Tiny(nn.Module):      # no BatchNorm: per-rank BN statistics would make DDP differ from one process
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.mean((2, 3)))


class TinyBN(nn.Module):    # BatchNorm: equal to one process only with TrainConfig.sync_bn
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1, stride=2, bias=False)
        self.b2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    init_from_env()
    rank, world = rank_world()
    mode = sys.argv[2] if len(sys.argv) > 2 else "plain"
    Net = TinyBN if mode.startswith("bn") else Tiny
    torch.manual_seed(1234 + rank)        # different init per rank on purpose: the broadcast must fix it
    model = Net()
    if rank == 0:
        sf.prune(model, sf.PatternConfig(num_patterns=4, connectivity=2.0, prune_first_conv=True))
    else:                                  # other ranks only get the mask buffers' shapes, values come from rank 0
        sf.prune(model, sf.PatternConfig(num_patterns=4, connectivity=1.0, prune_first_conv=True))
    if world == 1:                         # the 1-process reference starts from rank 0's model
        torch.manual_seed(1234)
        model = Net()
        sf.prune(model, sf.PatternConfig(num_patterns=4, connectivity=2.0, prune_first_conv=True))
    broadcast_model(model)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, max_steps_per_epoch=4, augment=False, threads=1,
                      channels_last=False, weight_decay=1e-3, sync_bn=mode == "bn-sync")
    data = make_synthetic(160)
    tl, _ = loaders_for(cfg, data, data)
    callbacks, tag = [], ""
    if mode == "kd-online":
        # online distillation: the teacher trains beside the student; under DDP its gradients are averaged too
        from sparseforge.distill import KDCallback, KDConfig

        torch.manual_seed(99)
        teacher = Tiny()
        callbacks, tag = [KDCallback(teacher, KDConfig(online=True, T=4.0, alpha=0.7))], "kd-"
    Trainer(model, cfg, tl, callbacks=callbacks, progress=False, log=lambda s: None).fit()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if callbacks:
        state.update({"teacher." + k: v.contiguous() for k, v in callbacks[0].teacher_model.state_dict().items()})
    tag = {"bn-sync": "bnsync-", "bn-local": "bnlocal-"}.get(mode, tag)
    save_file(state, str(out / f"{tag}rank{rank}-of-{world}.safetensors"))
    print(f"rank {rank}: done", file=sys.stderr, flush=True)      # the test tells a teardown abort from a failure


if __name__ == "__main__":
    main()

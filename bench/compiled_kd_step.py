"""One KD training step, eager vs torch.compile, before and after a partial batch (why compiled KD epochs ran no
faster than eager: automatic dynamic shapes after the epoch's last, smaller batch).

Run: python bench/compiled_kd_step.py {eager|cs|cs-ct|cs-ct-odd} [--static]
  cs: student compiled; ct: teacher compiled + frozen; odd: two steps on a batch of 80 first; --static:
  torch.compile(..., dynamic=False) as TrainConfig.compile now does. Synthetic batch 128, bf16 autocast,
  channels_last, 2 threads, median of 8 steps after 3 warm-up; prints ms.
"""
import copy
import statistics
import sys
import time

import torch

import sparseforge as sf
torch.set_num_threads(2); torch.manual_seed(0)
mode = sys.argv[1]
dyn = dict(dynamic=False) if "--static" in sys.argv else {}
t = sf.create_model("resnet56")
x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last); y = torch.randint(0, 10, (128,))
s = sf.prune(copy.deepcopy(t), sf.DepthConfig(blocks=14, importance="bn"), example_input=x[:1])
s = s.to(memory_format=torch.channels_last); t = t.to(memory_format=torch.channels_last).eval()
opt = torch.optim.SGD(s.parameters(), lr=0.01, momentum=0.9)
fwd = torch.compile(s, **dyn) if "cs" in mode else s
tf = torch.compile(t, options={"freezing": True}, **dyn) if "ct" in mode else t
def step(kd=True):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lo = fwd(x).float()
        loss = torch.nn.functional.cross_entropy(lo, y)
        if kd:
            with torch.no_grad():
                tl = tf(x).float()
            loss = loss + torch.nn.functional.kl_div(lo.log_softmax(1), tl.log_softmax(1), log_target=True, reduction="batchmean")
    opt.zero_grad(); loss.backward(); opt.step()
def tm(f, n=8):
    for _ in range(3): f()
    ts=[]
    for _ in range(n):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return 1e3*statistics.median(ts)
x80 = x[:80]; y80 = y[:80]
if "odd" in mode:
    xs, ys = x, y; x, y = x80, y80; step(); step(); x, y = xs, ys
print(mode, "student step only", round(tm(lambda: step(False))), "ms; kd step", round(tm(step)), "ms")
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    print(mode, "teacher fwd", round(tm(lambda: tf(x))), "ms")

"""Stage 3: plan -- layouts, compact sparse storage, filter-kernel reorder, thread balance, blocking.

Layout: every native feature map is stored per image as C planes of
(H + 2) rows x RS columns with a zero border of one pixel, RS = 8*ceil(W/8) + 2;
consecutive native ops never re-layout. Compact storage per conv: kernels are
grouped by *shape* (the set of non-zero taps: a pattern, a 1x1 tap, or the full
3x3 for dense kernels); per (shape, filter) a run of (input channel, weights).
Filters are sorted by (kept-kernel count, shape signature) and dealt to threads
by FLOPs (longest-processing-time first), so work is balanced, not filter counts.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import torch

from .ir import ConcatOp, ConvOp, EltwiseOp, GapOp, GatherOp, Graph, LinearOp, PhaseOp, PoolOp, ResizeOp, Value

VEC = 8                  # default floats per vector (AVX2); 16 on AVX-512 machines (see compile(vector_width=))
SLACK = 512              # floats after every buffer: over-reads by discarded vector lanes stay in bounds


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """The planner's tuning knobs: values passed in (``compile(plan_options=...)``), part of the plan's cache key
    and of a saved artefact; the defaults are what was measured best (comments say where)."""

    max_acc: int = 12                 # accumulators per block (registers)
    max_acc_wide: int = 16            # the same for 16-lane layers in an 8-lane plan (AVX-512: 32 vector registers)
    max_shapes: int = 16              # beyond this many distinct tap sets per layer, kernels use the full shape
    # gather mode: accumulator bytes per filter tile. 24 KB (half of L1) until session 38; 64 KB (in L2: a 512-filter
    # 7x7 layer's thread list is one tile, each (channel, shape) loop runs 2.7x the entries) measured, Zen 4 AVX-512,
    # b1, 2 threads, same process vs 24 KB, 60-300 alternating rounds: ResNet-18 8x at 224 1.023-1.025x (its four
    # 7x7 layers 1001 -> 918 us), ResNet-50 8x 1.014x, CIFAR VGG-16 8x 1.029x, ResNet-56 8x 1.024x; 128 KB: 1.032-
    # 1.055, 1.008, 1.043, 0.995x; 12 KB 0.97x
    gather_acc_bytes: int = 65536
    # ... on 16-register hosts, where the rows run a few vectors at a time (gather_rows_narrow): each (channel,
    # shape, row group) is a loop over the tile's filters that use it, ~3.5 of them in a 96-filter tile, and that
    # loop's set-up and mispredicted exit cost about as much as its work. Tiles of a thread's whole list (the
    # accumulators then live in L2) give each loop 2-3x the entries. Zen 3, one 512->512 7x7 layer, one thread:
    # 24 KB 0.80 ms, 32 KB 0.73, 64 KB 0.67, 128 KB 0.66 (12 KB 1.01); b1, 2 threads, same process vs 24 KB:
    # ResNet-18 8x at 224 1.03-1.04x, CIFAR VGG-16 8x 1.04-1.06x, ResNet-50 8x 1.01x; gather on 14x14 maps too
    # (gather_max 196) stays slower (0.93x)
    gather_acc_bytes_narrow: int = 131072
    # ... each channel's shifted rows packed inside the tiles' channel loop, right before its kernels run, into one
    # L1-resident channel area, instead of every channel up front: a 512-channel 7x7 layer's packed input is 9x
    # the input (1.2 MB per thread) and overflowed the 1 MB L2 that holds the accumulators and weights. Measured
    # b1, 2 threads, same process, in-network profiles, Zen 4: ResNet-18 8x at 224 its 7x7 layers 911 -> 786 us
    # (network 1.04x), CIFAR VGG-16 8x 1.07x; built for AVX2: ResNet-18 1.03x, CIFAR VGG-16 1.29x. (Summing each
    # kernel's taps as one FMA chain instead of a tree: 1.00x)
    gather_inline_pack: bool = True
    # 3x3 stride-2 max pools with padding 1 (every ResNet's) in registers, 16-lane vectors on AVX-512: no row
    # buffer, each window's three columns from the even and odd lanes of two loads (codegen._max_pool_3s2).
    # ResNet-18 at 224 in-network, b1, 2 threads, same process: native (Zen 4) 123-149 -> 102-112 us, ResNet-50
    # 98 -> 72 us; AVX2 build 151 -> 101 us. (Splitting its rows over threads as the stem conv wrote them instead
    # of its channels: 102 -> 127 us, not kept)
    pool_max_3s2: bool = True
    gather_min_cin: int = 128
    gather_max: int = 64              # output maps with at most this many pixels run in gather mode
    # ... on 16-register hosts: a shape's packed rows this many vectors at a time, every filter of the list passing
    # over each group (0: all at once, which spilled: 4 taps x 8 vectors on an 8x8 map). Zen 3, b1, 2 threads,
    # same process vs 0: CIFAR VGG-16 8x 1.06-1.08x, ResNet-18 8x at 224 1.02x; 3 and 4 as 2, 1 0.86x
    gather_rows_narrow: int = 2
    # ... their kernel entries (weights, filter indices) software-prefetched this many entries ahead (0: none). A
    # 512-channel 7x7 layer streams ~1.5 MB of weights and indices per image, which the L2 cannot hold and another
    # process streaming memory evicts from the L3: then the hardware prefetchers (which stop at each 4 KB page)
    # left the loop waiting on DRAM. Measured (session 44, Zen 4, b1, same process, alternating): one thread with
    # a process streaming 64 MB arrays on the other core, ResNet-18 8x at 224 13.3-14.5 -> 11.5-12.2 ms (32: 11.6,
    # 128: 11.7), ResNet-50 8x 35.0 -> 33.2 ms; its layer-4 convs had run 2.0-2.3x slower beside that process
    # than without it (the network 1.36x, onnxruntime 1.08x); quiet, one thread 1.00x, two threads ResNet-18
    # 1.01x, ResNet-50 1.02x
    gather_prefetch: int = 64
    spatial_ratio: float = 1.0        # batch 1: split rows, not filters, when input bytes >= this x weight bytes
    runs_in_walk_order: bool = True   # kernel runs stored in the order the threads walk them
    align_rows: bool = True           # row stride of wide maps a multiple of the vector width
    # ... of 16 floats in 8-lane plans on AVX-512 hosts (16-lane flat tiles): taps a row apart then share their
    # loads. Pattern 8x at 224, b1, 2 threads, Zen 4, vs rows of 8k floats: VGG-16-BN 1.02x, ResNet-18/50 1.01x,
    # MobileNetV2 1.05x; CIFAR VGG-16/ResNet-56/MobileNetV2 1.00/1.02/1.00x
    align_rows_wide: bool = True
    flat_tiled: bool = True           # stride-1 convs on wider maps: flat mode in tiles, tiles outside filters
    flat_tiled_min_bytes: int = 1 << 17   # ... when the input image is at least this large (measured: CIFAR
                                      # ResNet-56's 32x32x16 maps are faster untiled; 8x pattern 256->256 on 14x14,
                                      # 256 KB: 337 -> 187 us tiled; ResNet-18/50 8x at 224 1.10x/1.07x over 512 KB)
    # most vectors (accumulators) per tile of 1x1 convs on 32-register hosts. 12 until session 42; 10 measured
    # (pattern 8x at 224, b1, 2 threads, Zen 4, whole networks alternating, 60 runs, vs 12): ResNet-50 1.028x and
    # 1.138x (a noisy period), MobileNetV2 1.022x; 8: 1.021x, 1.096x, 1.024x. One 64->256 layer at 56x56 alone:
    # 8 1.04-1.06x, 16-24 0.77-0.86x: a tile's 256 filters' output rows and its input rows share L1/L2
    flat_tile: int = 10
    # ... of 1x1 convs on 16-register hosts (AVX2): the tile's accumulators and one broadcast weight fill the
    # registers, so each kernel's index, pointer and loop step serve 14 FMAs rather than 12 (pattern 8x at 224,
    # b1, 2 threads, Zen 3, same process vs 12: ResNet-50 1.08-1.10x, MobileNetV2 1.00-1.04x; 15: 0.99x and
    # 1.02x of 14)
    flat_tile_narrow: int = 14
    flat_tile_wide: int = 24          # the same on AVX-512 hosts
    # ... for 3x3 (kxk) convs: more vectors per tile share each kernel's taps' row reach (pattern 8x at 224, b1,
    # 2 threads, vs 12: ResNet-18 1.02x, ResNet-50 1.03x, VGG-16-BN 1.07x; 20 and 24: 0.92-0.96x of 14; CIFAR
    # VGG-16 1.00x, ResNet-56 0.99x)
    flat_tile_kxk: int = 14           # (a 14x14 map is then one tile: threads split its filters, not its tiles)
    # 16-register hosts (AVX2), kxk stride-1 convs on maps whose rows are whole vectors: flat tiles of rows x
    # vectors per row, at most this many accumulators (0 = off: tiles along the plane). The span starts at the
    # row's left border, so every centre-column tap loads an aligned vector; a kernel's taps go column by column
    # (only that column's weights in registers) and taps of a column a row apart load one vector for
    # accumulators a row apart (codegen._accumulate_shared). Loads, not FMAs, bound these loops on AVX2 (a load
    # per FMA, half the side columns' split across cache lines; AVX-512's lane shifts have no one-instruction
    # AVX2 equivalent). Shape per layer: _flat_rows_shape. One layer, one thread, Zen 4 built for AVX2, pattern
    # 8x, vs tiles along the plane: 128->128 at 28x28 1.18x, 64->64 at 56x56 1.11x, 128->128 at 112x112 1.12x
    flat_rows_narrow: int = 12
    # ... each tile's input copied (per thread, per channel block) into aligned rows, one copy per kernel column:
    # every tap's load is then aligned and from L1, and the copy is shared by every filter
    flat_pack_narrow: bool = True
    # ... prefetching the next tile's rows while packing (codegen._flat_pack): same process, b1, 2 threads, Zen 4
    # built for AVX2, vs without: ResNet-18 8x 1.02x, VGG-16-BN 8x 1.01x
    flat_pack_prefetch: bool = True
    # ... on inputs of at most this many bytes: larger maps stream from memory, which the plane-long tiles'
    # contiguous spans do better (2 threads, in-network, vs tiles along the plane: 128->128 at 112x112, 7.0 MB,
    # 1.16x; 64->64 at 224x224, 13.4 MB, 0.97x)
    flat_rows_max_bytes: int = 1 << 23
    # a phase-lowered (stride-2) conv planned flat runs the original kernels, each over its channel's s*s phase
    # planes (ConvPlan.chan_planes), instead of a kernel per phase channel with 1-2 of its taps: a kernel's index,
    # pointer and loop step serve its 4 taps (pattern 8x at 224, b1, 2 threads, Zen 4, in-network: ResNet-18's
    # 2x2 convs 276 -> 235 and 235 -> 222 us, ResNet-50's 360 -> 339 and 319 -> 319 us)
    phase_merge: bool = True
    # flat spans (tiles along the plane) start where the layer's busiest kernel column loads aligned vectors
    # (_busiest_column), not at the first interior position: a phase split's 2x2 conv has taps 0 or 1 column right,
    # so from the first interior column every tap's vector was assembled from two (a lane shift on AVX-512, a
    # cache-line split on AVX2). One 64->128 stride-2 layer at 56x56, Zen 4: native 1 thread 1.20x, AVX2 build 2
    # threads 1.16x (aligning its column 0)
    flat_align_column: bool = True
    block_outer_ratio: float = 1.0    # direct convs loop blocks outside filters when input >= this x weight bytes
    spatial_depthwise: bool = False   # measured slower on MobileNetV2 (b1, 2 threads): see plan_conv
    packed1_max: int = 64             # 1x1 convs with output maps of at most this many pixels run in packed mode
    packed1_chains: int = 4           # independent partial sums per output vector in packed mode
    # ... their kernel entries (weights, channel indices) software-prefetched this many entries ahead (0: none), as
    # gather mode's (gather_prefetch): ResNet-50's layer-4 1x1 convs stream 0.8-2.4 MB of them per image, which a
    # process streaming memory beside them evicts from the L3. Session 45, Zen 4, b1, same process, alternating,
    # one thread with bench/memory_contention.py's streaming process on the other core: ResNet-50 8x at 224
    # 32.6 -> 30.1 ms (256 entries: 31.0), quiet 1.00x; two threads, quiet: ResNet-50 1.017x, MobileNetV2 1.017x,
    # ResNet-50 built for AVX2 1.014x. (Prefetching flat tiles' next-tile input and output planes the same way
    # changed nothing beyond noise: 0.99-1.02x quiet and beside the process, not kept)
    packed1_prefetch: int = 64
    # 16-register hosts: packed rows (packed 1x1, gather, fused blocks) in 8-lane vectors, chains cut to keep 12
    # accumulators (16-lane ones are two registers each, and 4 chains of a 7x7 map's 4 vectors spilled)
    packed_narrow: bool = True
    # 16-register hosts: flat modes' kernels a tap at a time when the tile's accumulators and the kernel's weights
    # outnumber the registers
    tap_major: bool = True
    sparse_linear_density: float = 0.4   # linear layers at most this dense run as CSR sparse GEMV
    # ... their kept weights and column indices software-prefetched this many entries ahead (0: none): the
    # hardware prefetchers stop at every 4 KB page, and VGG-16's 25088->4096 layer (8x: 77 MB of weights and
    # indices per image) read them at 15 GB/s of the ~26 DRAM gives. Layer alone, b1, 2 threads, same process,
    # Zen 4: 5050 -> 3430 us (1024; 256: 3410, 4096: 3350), its 4096->4096 546 -> 421 us; AVX2 build 4169 -> 3280
    linear_prefetch: int = 1024
    blocked_min_density: float = 0.75    # convs at least this dense run in blocked mode (see ConvPlan.blocked)
    blocked_f: int = 3                # filters per register block in blocked mode
    # ... on 16-register hosts, where blocked mode runs only convs with few weights per pixel (RGB stems: the
    # rest go to output-channel blocks): 6 filters x 2 vectors, each input vector serving 6 broadcast weights.
    # One layer, one thread, Zen 3, vs 3: 3->64 3x3 at 224 (VGG) 4.06 -> 3.40 ms, MobileNetV2's phase-split
    # 3->32 stem 0.58 -> 0.38, CIFAR 3->16 / 3->64 at 32x32 1.37x / 1.52x; 4: 0.8-0.97x, 8: as 6 or slower
    blocked_f_narrow: int = 6
    blocked_acc: int = 12             # accumulators per block (+ R*V input vectors + 1 weight: AVX2's 16 registers)
    blocked_acc_wide: int = 24        # the same with AVX-512's 32 registers
    # blocked convs on 32-register hosts: vectors along output channels (ConvPlan.blk_ochan); measured one
    # layer on one core (Xeon AVX-512): 3x3 convs 56x56x32 .. 7x7x512 63-82 vs 39-47 GMAC/s for pixel vectors,
    # 1x1 convs 46-52 vs 32-41; whole dense ResNet-18 at 224 (b1, 2 threads) 27.2 -> 17.1 ms
    blocked_ochan: bool = True
    ochan_acc: int = 16               # output pixels per register block in that mode (one vector each; 24: slower)
    # 1x1 convs: vectors of 16 filters per block (more pixels share each weight load); 0: per layer, the fewest
    # estimated cycles of 1, 2 or 4 (_ochan_1x1_vecs: filters wasted in the last block, FMAs vs loads per channel,
    # the epilogue's transposes). Measured one layer at a time, RepGhostNet 1.0x at 224, Zen 4: on 14x14 maps one
    # vector is 1.06-1.34x faster than two (80-336 filters: two waste up to 20% of a block), on 7x7 maps two are
    # 1.04-1.12x faster than one, on 1x1 maps four are 1.11x faster than two (conv_head); whole network 1.03x
    ochan_vecs_1x1: int = 0
    ochan_acc_1x1: int = 24           # ... and accumulators per block
    # ... which takes convs this dense (the sparse modes' time per kept weight is 2.1-2.4x ochan's per weight
    # for 3x3 convs, 2.1-4.4x for 1x1 convs at 224-size shapes: at 0.5 ochan ties or wins)
    ochan_min_density: float = 0.5
    # sparser convs whose 16-filter blocks share their kept kernels and taps (channel_block 16 pruning) run
    # in the same mode over each block's kept kernels only, when the blocks' weight vectors are at least this
    # full (the kept weights over 16 x the block's taps)
    ochan_sparse_min_fill: float = 0.75
    ochan_sparse_vmax: int = 8         # ... with at most this many pixels of a row per block (more rows: measured
                                       # 50-57 vs 48-52 GMAC/s per core at 16, 3x3 cb16 layers 28x28x128, 56x56x64)
    ochan_max_w: int = 9               # kernels of at most this many weight vectors keep them all in registers
    # maps >= 16 wide whose blocks have at most this many weight vectors per pixel (few input channels, or few
    # kept kernels): blocks of one row of 16 pixels, transposed in registers for a vector epilogue
    ochan_row_max_work: int = 64
    # 16-register hosts: dense k x k convs (k > 1) with at most this many weights per output (cin x k x k) run
    # in pixel-vector blocks of blocked_f_narrow filters, not output-channel blocks: few channels leave the
    # output-channel block's per-element epilogue and its weight vectors too little to amortise over. Zen 3, b1,
    # 2 threads, same process vs 64: ResNet-18 8x at 224 1.02x (its phase-split 7x7 stem, 12 x 16 = 192 weights:
    # 1.68 -> 1.50 ms), dense CIFAR ResNet-56 1.05x (its 16-channel 3x3 convs), dense ResNet-18/50 at 224
    # 0.99-1.00x; 576 (64-channel 3x3 convs too): dense ResNet-56 1.14x but dense ResNet-50 0.98x
    blocked_kxk_max_work_narrow: int = 256
    # AVX2 hosts (16 registers): the same mode with each 16-filter vector two 8-lane halves, a tap at a time (gcc
    # folds the weight halves into the FMAs and shares each broadcast input between taps; holding the weights in
    # registers measured 0.72-0.83x on 3x3 layers). Zen 3, vs pixel-vector blocks: dense ResNet-18 at 224, b1,
    # 2 threads, same process 1.31x; dense engine / onnxruntime fp32 ResNet-50 2.20 -> 1.30, VGG-16-BN 1.82 ->
    # 1.23. Pixels per block (one layer at a time, one thread): 5 for kxk convs (4-5 on 14-56 wide maps; 6:
    # 0.78-0.95x, 4 on 14x14: 0.72x), 7 for 1x1 convs (6: 0.57-0.95x)
    ochan_narrow: bool = True
    ochan_acc_narrow: int = 5
    ochan_acc_1x1_narrow: int = 7
    # dense kxk convs in output-channel blocks on 16-register hosts, maps of at most ochan_kchunk_max_pixels:
    # input channels in chunks of this many, all the map's blocks per chunk (codegen._blocked_ochan_conv). Zen 3,
    # b1, 2 threads, same process vs none: dense ResNet-18 1.02-1.03x (its 7x7 512 -> 512 convs 1.10x), ResNet-50
    # and VGG-16-BN 1.00x; chunks of 32 1.01x, 1x1 convs chunked 0.96x (ResNet-50)
    ochan_kchunk_narrow: int = 16
    ochan_kchunk_max_pixels: int = 196
    max_group: int = 2                # most adjacent filters run as one group (ConvPlan.fgroup; 1 = off); measured
                                      # no faster at 4 on ResNet-18/50, MobileNetV2 at 224
    fgroup_waste: float = 1.05        # groups run when the union of their taps costs at most this much extra
    # 1x1 stride-1 convs run flat-tiled on maps of any size (tv vectors x every kept weight per register block,
    # not a 2-row block): one layer, one core, Xeon AVX-512, 8x connectivity: 256->1024 on 14x14 1111 -> 658 us,
    # 128->512 on 28x28 812 -> 745 us
    flat_tiled_1x1: bool = True
    # flat tiles of 16-lane vectors in 8-lane plans on AVX-512 hosts: the same layers 658 -> 556 and 745 -> 546 us
    # (rows a multiple of 8: on 112-wide maps, rows of 120, the loads are not all aligned; measured no slower)
    flat_wide: bool = True
    # ... and for kxk convs on maps at least this wide (0 = off) whose width is a multiple of 16 (which would
    # otherwise run in direct mode with 16-lane vectors), when a tile of flat_tile_kxk vectors spans more than a
    # row (taps a row apart then share loads: codegen._accumulate_shared; direct mode's blocks of rows share them
    # too). Pattern 8x VGG-16-BN at 224, b1, 2 threads, Zen 4, in-network: 112x112 64->128 3.99 -> 2.83 ms,
    # 128->128 7.26 -> 5.43 (before shared loads; after: 4.98 -> 4.50); on 224x224 (rows of 15 vectors) direct
    # mode with shared loads wins, 5.56 vs 4.68 ms. On CIFAR's 32x32 maps flat tiles were slower (99 vs 141 us)
    flat_wide_kxk_min_width: int = 64
    # ... and on maps whose rows are flat_tile_kxk vectors or longer, in tiles of this many (0 = direct mode there):
    # a tile then spans more than a row again. Pattern 8x VGG-16-BN at 224, b1, 2 threads, Zen 4, in-network, now
    # that spans start at the busiest column (flat_align_column): 224x224 64->64 4117 -> 3871 us; one layer alone
    # 16 / 20 / 24 / 30 vectors 1.10 / 1.07 / 1.10 / 0.95x of direct mode
    flat_tile_kxk_long_rows: int = 20
    # flat and direct sparse convs on 16-lane vectors: aligned loads and lane shifts instead of a load per tap
    # column (codegen._accumulate_shared)
    shift_loads: bool = True
    # element-wise ops and the global pool: channels on the threads that wrote them, images in whole rounds
    # (instead of channels interleaved over threads)
    chan_affinity: bool = True
    fuse_blocks: bool = True          # fuse 1x1 expand -> 3x3 depthwise -> 1x1 project on small maps (BlockPlan)
    fuse_se_scale: bool = True        # squeeze-excite's x * gate into the next dense 1x1 conv (ConvPlan.in_scale)
    # channel concatenations written in place: the producer of each input writes its channel range of the
    # concatenation (the input's planes are a slice of the output's buffer), so the concat copies nothing
    concat_in_place: bool = True
    # a 1x1 conv whose residual is another 1x1 conv's output that nothing else reads (the projection block of
    # every bottleneck ResNet: bn3(conv3(y)) + bn(downsample(x))) becomes one 1x1 conv over [y; x] stacked in
    # place (see lower): the main branch's output is never written and read back as a residual
    fuse_projection: bool = True
    # depthwise 3x3 stride-1 convs on maps > small_w wide (AVX-512): output rows as masked vectors, a block of
    # rows in registers, each input row loaded once for the (up to) three output rows it feeds (ConvPlan.dwrow).
    # Direct mode ran a 14-wide row as two 8-lane vectors, a load per tap and a partial store element by element:
    # RepGhostNet's 14x14 ones at ~26 GMAC/s against ~55 on 28x28 maps; one thread 14x14x336 30.6 -> 14.4 us
    dw_rows: bool = True
    dw_rows_s1_max_width: int = 256   # ... stride 1 on maps at most this wide (> 16: rows in chunks of 16 columns)
    # ... and depthwise 3x3 / 5x5 stride-2 convs with outputs at most this wide, in chunks of DW_CHUNK columns
    # (a 5x5 one then needs no phase split: RepGhostNet's 14x14 -> 7x7 ones 37 + 12 us -> 17 us)
    dw_rows_s2_max_width: int = 64
    fuse_bands: bool = True           # fuse 1x1 expand -> 3x3 depthwise on larger maps, in bands of rows (BandPlan)
    band_dense_min_bytes: int = 1 << 22   # ... dense expand convs too (F channels per step, dense weights) when the
                                      # expanded map is at least this large (dense MobileNetV2 at 224: the 5.5 MB
                                      # 112x112 one 357 -> 323 us fused; 2 MB 56x56 ones 179 -> 195, 7x7 ones slower)
    band_f: int = 6                   # expanded channels per step of a dense expand (MobileNetV2 dense: 2 0.83x,
                                      # 4 0.94x, 6 1.0, 8 1.0, 12 0.99)
    band_rows: int = 16               # most output rows per band
    band_min_pixels: int = 0          # ... on depthwise outputs of more pixels than this (CIFAR MobileNetV2 8x: 0
                                      # 0.546 ms, 64 0.570; at 224 the same)
    # flat-tiled sparse convs whose tile input (every channel's window: tile + the taps' reach) is larger than
    # this many bytes run their kernels in blocks of input channels whose windows fit it: every filter of the
    # thread passes over one block (read from L1) before the next, partial sums per filter in scratch memory.
    # Without it each filter streams the whole window from L2 (ResNet-50's 3x3 layers at 56x56x64: 310 floats
    # x 64 channels = 79 KB per tile). 0 = off. Measured (Xeon AVX-512, 48 KB L1, pattern 8x at 224, b1): ResNet-50
    # 39.0 -> 35.4 ms on one thread, 23.2 -> 21.9 on two; MobileNetV2 2.77 -> 2.62 ms on two; 32 KB and 96 KB: less
    flat_cblock_bytes: int = 49152
    # flat modes: the kernels of all tap shapes of a (filter, channel block) in one stream walked with running
    # pointers, not per-shape arrays: with 8 shapes and ~3 kernels per (filter, block), the 24 per-shape
    # pointers spilled and each shape's run set-up cost about as much as its kernels
    merged_runs: bool = True
    # channel indices of the kept kernels as 2-byte integers (inputs of at most 65536 channels): with a pattern
    # kernel's 4 weights an index is 1/5 of the stream, with a 1x1 conv's 1 weight 1/2 (as int32)
    index16: bool = True
    # 3x3 stride-2 convs at most this dense, on inputs of at least flat_tiled_min_bytes and outputs larger than
    # gather_max pixels: a phase split (space-to-depth) and a 2x2 stride-1 conv over it, flat-tiled (see lower).
    # Measured pattern 8x, b1, 2 threads, Xeon AVX-512: ResNet-50 at 224 layer2.0.conv2 780 -> 525 + 219 us (the
    # split), layer3.0.conv2 968 -> 404 + 102 us, whole network 1.03x, ResNet-18 1.03x; on 7x7 outputs gather mode
    # is faster (425 vs 711 us), and CIFAR ResNet-20/56's small maps lose 8% / 3%
    phase_s2_max_density: float = 0.5
    # ... and, on 16-register hosts, dense ones with at most this many input channels (an RGB stem: 27 weights per
    # output, too few for output-channel blocks, so pixel vectors, each assembled from two loads and a shuffle;
    # over the phases every load is one aligned-or-not load). MobileNetV2's 3->32 stem at 224, one thread, Zen 3:
    # 0.79 -> 0.59 ms; whole network 8x, b1, 2 threads, same process: 1.04x. 0: off
    phase_s2_stem_cin_narrow: int = 4
    # dilated and non-square convs run embedded in a square kernel (trace.embed_conv) when at most this fraction of
    # their kernels (filter x input channel) keeps a weight (negative: none); the others stay in oneDNN. Measured
    # session 46 (Zen 4 AVX-512, 2 threads, one conv, 3x3 dilation 2-3 at 28x28 and 56x56 with 128-512 channels,
    # 1x7 / 7x1 at 17x17, vs onnxruntime; bench/embedded_convs.py): dense 0.73-0.92x, patterns alone (every kernel,
    # 4 taps) 0.63-1.58x, magnitude 8x (70% of the kernels, ~1.3 taps each: per-kernel overhead) 0.52-1.15x, a
    # quarter of the kernels 0.92-2.92x, pattern 8x (28%) 2.0-4.7x ...
    embed_max_kernels: float = 0.5
    # ... and grouped or depthwise ones stay in oneDNN unless this is set (onnxruntime's depthwise kernel was 2x
    # faster than the embedded one in every arm measured; tests and the fuzz set it)
    embed_grouped: bool = False
    # code that picks, reorders or repeats whole channels (chunk, split, a channel slice, ShuffleNet's channel
    # shuffle; trace.channel_gathers) runs as native plane copies instead of PyTorch fallbacks
    channel_gathers: bool = True
    # nearest and bilinear F.interpolate / nn.Upsample run natively (tables from PyTorch's index rules)
    native_resize: bool = True
    # dense stride-1 1x1 convs on 32-register hosts with output maps of at least this many pixels and rows a
    # multiple of 16 floats: a GEMM micro-kernel along the flattened plane (ConvPlan.flat_gemm), gemm_mr filters x
    # gemm_nr 16-lane vectors in registers, every input vector loaded once for gemm_mr filters, stored straight
    # into the planar output. Measured one layer, one core, Xeon AVX-512, vs blocked output-channel mode: 56x56
    # 144->24 284 -> 157 us, 64->256 879 -> 645, 256->64 860 -> 719; 28x28 128->512 830 -> 623, 512->128 781 ->
    # 695; 14x14 mixed (256->1024 631 -> 668, 1024->256 717 -> 646); 7x7 (16-float rows, 7 used) 178 -> 399, and
    # 112x112 (120-float rows: unaligned) 421 -> 561: those stay in blocked mode
    flat_gemm_min_pixels: int = 784
    # ... and on maps whose rows are not a multiple of 16 floats when the conv has at most this many input
    # channels (0: never): few channels give blocked mode little to amortise its transposing epilogue over.
    # Measured b1, 2 threads, Zen 4, A/B in one process: RepGhostNet 1.0x at 224 (16->24, 8->16 at 112x112)
    # 1.03-1.05x, dense MobileNetV2 at 224 1.03x, ResNet-18 unchanged (aligned rows)
    flat_gemm_unaligned_cin: int = 32
    gemm_mr: int = 6
    gemm_nr: int = 4
    # ... on 16-register hosts (AVX2) with 8-lane vectors: gemm_mr_narrow filters x gemm_nr_narrow vectors (12
    # accumulators, the tile's input vectors and one broadcast weight fit 16 registers), rows a multiple of 8
    # floats. Measured Zen 3, b1, 2 threads at 224, same process vs output-channel blocks (off): dense
    # MobileNetV2 1.08x, dense ResNet-50 1.08x; 4 x 3 blocks 1.03x / 0.96x, 5 x 2 as 6 x 2
    flat_gemm_narrow: bool = True
    gemm_mr_narrow: int = 6
    gemm_nr_narrow: int = 2
    # ops of a native segment as parts that threads claim (each its own partition first, then any part nobody
    # has started; an op waits for its predecessor's parts to be done instead of a barrier), on the library's
    # own thread pool (thread_pool, Linux: pthreads + futex) instead of OpenMP regions: the caller never waits
    # for a thread that has not started, and a worker that wakes after the call is over claims nothing. Every
    # wait spins at most pool_spin_us (a worker between calls pool_idle_us), then sleeps on a futex. Measured
    # (session 27, AMD EPYC Zen 4, 2 vCPUs, b1, 2 threads; bench/contention.py and ARCHITECTURE.md "Shared
    # cores"): beside busy processes MobileNetV2 8x at 224 p90 9-10 ms vs 150 with OpenMP barriers (onnxruntime
    # 24), the first call after 30 ms idle 5.5 vs 14 ms (onnxruntime 5.2), CIFAR ResNet-56 1.2 vs 11-16 ms;
    # quiet back-to-back within noise of OpenMP. Off (claim_parts=False, thread_pool=False): OpenMP barriers.
    claim_parts: bool = True
    thread_pool: bool = True
    pool_spin_us: int = 1000
    pool_idle_us: int = 200


DEFAULT_OPTIONS = PlanOptions()


@dataclasses.dataclass
class Layout:
    shape: tuple[int, ...]
    is_map: bool         # padded (C, H+2, RS) planes; else a plain contiguous vector per image
    rs: int = 0          # row stride (maps)
    plane: int = 0
    image: int = 0       # floats per image


def small_w(vec: int) -> int:
    """Maps this narrow are stored with RS = W + 2 and convolved in "flat" mode."""
    return 6 if vec == 8 else 12


def layout_for(shape: tuple[int, ...], flat: bool = False, vec: int = VEC, align_rows: bool = True,
               row_align: int = 0) -> Layout:
    """``row_align``: wider maps' rows a multiple of this many floats (default: ``vec``)."""
    if len(shape) == 3 and not flat:
        c, h, w = shape
        # Narrow maps: tight rows, so a vector spans several rows (flat mode) instead of one mostly empty row.
        # wider maps: rows a whole number of vectors (planes start vector-aligned, so flat-mode 1x1 convs load
        # aligned vectors)
        ra = row_align or vec
        rs = w + 2 if w <= small_w(vec) else (ra * math.ceil((w + 2) / ra) if align_rows else vec * math.ceil(w / vec) + 2)
        plane = (h + 2) * rs
        return Layout(shape, True, rs, plane, c * plane)
    n = int(np.prod(shape)) if shape else 1
    return Layout(shape, False, 0, 0, n)


class Blob:
    """Append-only float and int arrays; codegen refers to offsets into them."""

    def __init__(self) -> None:
        self.f: list[np.ndarray] = []
        self.i: list[np.ndarray] = []
        self.nf = 0
        self.ni = 0

    def add_f(self, a, align: int = 1) -> int:
        """``align``: start at a multiple of this many floats (vector loads that never split a cache line,
        given the blob's own 64-byte-aligned base)."""
        a = np.ascontiguousarray(np.asarray(a, dtype=np.float32).ravel())
        if self.nf % align:
            self.f.append(np.zeros(align - self.nf % align, np.float32))
            self.nf += align - self.nf % align
        off = self.nf
        self.f.append(a)
        self.nf += a.size
        return off

    def add_mask(self, keep) -> int:
        """Lane masks as all-ones / all-zero bit patterns in the float blob: kernels AND them in, so a masked lane
        is exactly 0 even where the value is NaN or Inf (a 0/1 multiply would keep NaN and turn Inf into NaN)."""
        bits = np.where(np.asarray(keep, dtype=bool), np.int32(-1), np.int32(0)).astype(np.int32)
        return self.add_f(bits.view(np.float32))

    def mark(self) -> tuple[int, int, int, int]:
        return len(self.f), self.nf, len(self.i), self.ni

    def rewind(self, mark: tuple[int, int, int, int]) -> None:
        """Drop what was added since ``mark``: a plan tried and not kept leaves nothing behind."""
        del self.f[mark[0]:], self.i[mark[2]:]
        self.nf, self.ni = mark[1], mark[3]

    def add_i(self, a) -> int:
        a = np.ascontiguousarray(np.asarray(a, dtype=np.int32).ravel())
        off = self.ni
        self.i.append(a)
        self.ni += a.size
        return off

    def add_u16(self, a) -> int:
        """Values below 65536 as 2-byte integers, two per int of the blob (offset in ints; C reads them through an
        ``unsigned short*``): channel indices stream beside every kept weight, so they are half the bytes."""
        a = np.asarray(a, dtype=np.int64).ravel()
        assert a.size == 0 or (a.min() >= 0 and a.max() < 65536), "add_u16: values out of range"
        u = np.zeros(a.size + (a.size & 1) or 2, dtype=np.uint16)
        u[:a.size] = a
        return self.add_i(u.view(np.int32))

    def floats(self) -> np.ndarray:
        return np.concatenate(self.f) if self.f else np.zeros(1, np.float32)

    def ints(self) -> np.ndarray:
        return np.concatenate(self.i) if self.i else np.zeros(1, np.int32)


class KernelRuns:
    """The kernels of one tap shape of a conv: filter, input channel and weights per kernel, sorted by filter."""

    def __init__(self, f: np.ndarray, ch: np.ndarray, w: np.ndarray, filters: int):
        self.f, self.ch, self.w = f, ch, w
        self.count = np.bincount(f, minlength=filters).astype(np.int64)
        self.begin = np.concatenate([[0], np.cumsum(self.count)]).astype(np.int64)

    def gather(self, filters: np.ndarray) -> np.ndarray:
        """Kernel indices of ``filters``, filter after filter in the order given."""
        if len(filters) == 0:
            return np.zeros(0, dtype=np.int64)
        lens = self.count[filters]
        total = int(lens.sum())
        if total == 0:
            return np.zeros(0, dtype=np.int64)
        starts = self.begin[filters]
        offs = np.concatenate([[0], np.cumsum(lens)[:-1]])
        return np.repeat(starts - offs, lens) + np.arange(total)


@dataclasses.dataclass
class ConvPlan:
    op: ConvOp
    shapes: list[tuple[int, ...]]        # tap indices (ky*kw + kx, + phase * kh*kw if chan_planes > 1) per shape
    kh: int
    ho: int
    wo: int
    rows: int                            # R: output rows per block
    vecs: int                            # V: vectors per block along x
    xv: int                              # vectors per output row
    bias_off: int = 0
    start_off: list[int] = dataclasses.field(default_factory=list)   # per shape: (F+1) ints, by flist position
    chan_off: list[int] = dataclasses.field(default_factory=list)
    w_off: list[int] = dataclasses.field(default_factory=list)
    tstart_off: int = 0
    flist_off: int = 0
    kernels: int = 0
    taps: int = 0
    flops: int = 0
    flat: bool = False                   # vectorise along the flattened padded plane (narrow maps)
    flat_p0: int = 0                     # first interior plane position
    flat_nv: int = 0                     # vectors covering [p0, last interior position]
    flat_mask_off: int = 0               # 0/1 lane masks (border positions), flat_nv * vec floats
    # tiled flat mode (larger maps): the flat range in tiles of flat_tv vectors, tiles outside the filter loop, so
    # every filter reads the tile's input (Cin x flat_tv vectors, contiguous per channel) from L1/L2 and the
    # loads run along memory (no row jumps, few pages); the last tile is shifted back to end at the last vector
    flat_tv: int = 0
    # ... 2-D tiles (PlanOptions.flat_rows_narrow): flat_rt rows of flat_tv vectors each, from the row's left
    # border (flat_p0 = rs); flat_rv vectors per row stride, flat_jn of them reach the row's last interior column
    flat_rt: int = 0
    flat_rv: int = 0
    flat_jn: int = 0
    # ... each tile's input copied per thread into aligned rows, one copy per kernel column (PlanOptions.flat_pack)
    flat_pack: bool = False
    # ... and in blocks of flat_cb input channels (PlanOptions.flat_cblock_bytes): flat_ncb blocks, runs indexed
    # by (filter position, block), partial sums kept per filter in scratch memory between blocks
    flat_cb: int = 0
    flat_ncb: int = 1
    # flat modes (PlanOptions.merged_runs): the kernels of every shape in one stream (see _merge_runs), in place
    # of the per-shape start_off / chan_off / w_off arrays
    merged: bool = False
    merged_off: int = 0
    merged_woff: int = 0
    merged_ch_off: int = 0
    merged_w_off: int = 0
    # dense 1x1 GEMM mode (PlanOptions.flat_gemm_min_pixels): tiles of flat_tv vectors along the plane x blocks of
    # gemm_mr filters, weights packed [filter block][channel][filter in block] (zero filters pad the last block);
    # threads take contiguous runs of (tile, filter block) items
    flat_gemm: bool = False
    gemm_mr: int = 0
    gemm_w_off: int = 0
    vec: int = VEC
    # images not split by image (batch 1): threads take row ranges of every filter rather than filter lists,
    # for activation-heavy layers in direct mode (see plan_conv)
    spatial: bool = False
    # blocks outside, filters inside: each (rows x vectors) block's input window is read from L2 by every filter
    # instead of every filter streaming the whole map from L3/DRAM (large maps: 56x56x256 is 3.2 MB)
    block_outer: bool = False
    thread_of: list[int] = dataclasses.field(default_factory=list)   # filter -> thread (filter-split runs)
    # gather mode (small maps, any stride): the input's shifted windows are first packed per (image, channel,
    # tap) into dense aligned rows of ho*wo pixels in scratch memory, so every vector lane is a real output
    # pixel and the FMAs read aligned vectors; without it a 4x4 map fills 16 of 24 lanes and the few
    # accumulators leave the FMA units waiting on latency.
    gather: bool = False
    gather_taps: tuple[int, ...] = ()    # taps packed (union over shapes), in order
    gather_vec: int = 16                 # lanes of the gather vectors
    gather_pv: int = 0                   # vectors per output map
    # kernels run channel-major within tiles of filters: the tile's accumulators (ft x ps floats) stay in L1
    # and each packed input row is read once per tile from L2, not once per filter
    gather_ft: int = 1                   # filters per tile
    # each channel's rows packed in the tile's channel loop, just before its kernels (PlanOptions.gather_inline_pack)
    gather_inline: bool = False
    # packed 1x1 mode: the input's interiors are packed per image into dense rows of ho*wo pixels (16-lane
    # vectors, no border lanes) and every kept weight is one FMA per vector, accumulated in registers
    packed1: bool = False
    # depthwise row mode (PlanOptions.dw_rows): blocks of ``rows`` output rows, each row masked vectors; the k*k
    # weights of filter f dense at dw_w_off + k*k f (zeros included: PyTorch multiplies them too)
    dwrow: bool = False
    dw_w_off: int = 0
    gather_tile0_off: int = 0            # per thread: first tile (threads + 1 ints)
    gather_tf_off: int = 0               # per tile: first filter in gather_fl (tiles + 1 ints)
    gather_fl_off: int = 0               # filters, tile by tile
    gather_cnt_off: int = 0              # per (tile, input channel, shape): kernel count
    gather_te_off: int = 0               # per tile: its first entry and first weight
    gather_ef_off: int = 0               # filter of every entry, tile by tile, (channel, shape, filter) order
    gather_ew_off: int = 0               # weights of every entry, in the same order
    # blocked mode (dense layers: stems, unpruned networks): blocked_f filters x (rows x vecs) output vectors in
    # registers; every input vector loaded once serves blocked_f filters (the sparse modes load it per filter),
    # weights stored densely per block of filters as [channel][tap][filter]; zero weights are multiplied
    blocked: bool = False
    blk_f: int = 0
    blk_nb: int = 0                      # filter blocks (the last one padded with zero filters)
    blk_w_off: int = 0
    blk_b_off: int = 0
    blk_taps: list = dataclasses.field(default_factory=list)   # per channel phase (tap_period): taps it runs
    # vectors along output channels instead of pixels: a block is blk_f = 16 filters x rows x vecs output
    # pixels, one accumulator per pixel; per (channel, tap) one aligned weight vector and a broadcast input
    # value per pixel, each value broadcast once for every tap that reads it. No shifted (cache-line-splitting)
    # vector loads; the epilogue transposes the block to the planar output (AVX-512: in registers, one masked
    # store per filter and output row; else through a small buffer).
    blk_ochan: bool = False
    # lanes of its vectors: 16 (32 registers: a kernel's or kernel row's weight vectors stay in registers while
    # inputs are broadcast), or 8 on 16-register hosts (each 16-filter vector two halves, a tap at a time)
    blk_lanes: int = 16
    # ... over each 16-filter block's kept kernels only (channel_block 16 pruning): per block and tap shape a
    # kernel count, the kernels' channels, each block's first kernel and first weight
    blk_sparse: bool = False
    # a squeeze-excite multiply fused in (dense output-channel blocks of a 1x1 conv whose input x * gate has no
    # other reader): the conv reads x (``in_value``) and scales each input channel's weight vectors by the
    # image's gate value (``in_scale``: the (C, 1, 1) gate); the multiply's own pass over the map is gone
    in_value: int = -1
    in_scale: int = -1
    idx16: bool = False                  # kernel channel indices stored as 2-byte integers (PlanOptions.index16)
    blk_cnt_off: int = 0
    blk_ch_off: int = 0
    blk_kst_off: int = 0
    blk_wst_off: int = 0
    # filter groups (direct and flat modes): fgroup adjacent filters share their kernels (channel_block
    # pruning) and run together, fgroup x the accumulators, each input vector loaded once for all of them;
    # thread lists, runs and ``thread_of`` are per group, weights [kernel][tap][filter of the group]
    fgroup: int = 1
    # a phase-lowered conv whose kernels are the original ones (PlanOptions.phase_merge): a kernel's channel is
    # chan_planes consecutive phase planes, its taps phase-major over them (tap_offset)
    chan_planes: int = 1

    def tap_offset(self, t: int, rs: int, plane: int) -> int:
        """Input offset of tap ``t`` from an output position (flat modes: input and output share the row stride)."""
        kh, kw = self.op.weight.shape[2:]
        ph, t = divmod(t, kh * kw)
        return ph * plane + (t // kw - self.op.padding) * rs + (t % kw - self.op.padding)

    @property
    def kchans(self) -> int:
        """Channels the kernels index: input channels, or groups of chan_planes phase planes."""
        return self.op.weight.shape[1] // self.chan_planes

    def partials_floats(self) -> int:
        """Floats of one thread's partial sums in channel-blocked flat tiles: a tile for every filter."""
        return self.op.weight.shape[0] * self.flat_tv * max(1, self.flat_rt) * self.vec if self.flat_cb else 0

    def scratch_floats(self) -> int:
        """Floats of one thread's scratch in flat tiles: its partial sums, then its packed tile (a channel block's
        channels, or every channel)."""
        return self.partials_floats() + (self.flat_cb or self.op.weight.shape[1]) * self.pack_geometry()[3]

    def pack_geometry(self) -> tuple[list[int], int, int, int]:
        """Packed 2-D flat tiles (``flat_pack``): the kernel columns any tap uses, rows and floats per packed row
        (the tile's rows + the kernel's reach; its vectors), floats per channel (0 when not packed)."""
        if not self.flat_pack:
            return [], 0, 0, 0
        kh, kw = self.op.weight.shape[2:]
        cols = sorted({t % kw for sh in self.shapes for t in sh})
        rh, tw = self.flat_rt + kh - 1, self.flat_tv * self.vec
        return cols, rh, tw, len(cols) * rh * tw

    @property
    def mode(self) -> str:
        """The kernel family codegen uses: flat-gemm, blocked, gather, packed1, dwrow, flat-tiled, flat or direct
        (exclusive)."""
        if self.dwrow:
            return "dwrow"
        if self.flat_gemm:
            return "flat-gemm"
        if self.blocked:
            return "blocked"
        if self.gather:
            return "gather"
        if self.packed1:
            return "packed1"
        if self.flat:
            return "flat-tiled" if self.flat_tv else "flat"
        return "direct"


def _canonical_shapes(tapsets, full: tuple[int, ...],
                      max_shapes: int = DEFAULT_OPTIONS.max_shapes) -> dict[tuple[int, ...], tuple[int, ...]]:
    """Map each distinct tap set to the shape its kernel will run with (merging rare subsets into supersets).
    ``tapsets``: one tap set per kernel, or a mapping tap set -> number of kernels."""
    freq = Counter(tapsets) if not isinstance(tapsets, dict) else tapsets
    order = sorted(freq, key=lambda s: (-freq[s], s))
    mapping: dict[tuple[int, ...], tuple[int, ...]] = {}
    kept: list[tuple[int, ...]] = []
    for s in order:
        sup = next((k for k in kept if set(s) <= set(k)), None)
        if sup is not None:
            mapping[s] = sup
        else:
            kept.append(s)
            mapping[s] = s
    if len(kept) > max_shapes:
        return {s: full for s in freq}
    return mapping


def _kernel_shapes(codes: np.ndarray, taps_all: tuple[int, ...], exact: bool, max_shapes: int):
    """Kernels of a (filters x channels) array of tap-set bit codes: filter and channel of each kernel
    (filter-major), its code, the tap shapes the layer runs (rare subsets merged into supersets unless
    ``exact``), each kernel's shape index, and the taps each filter runs."""
    kf, ki = np.nonzero(codes)
    kc = codes[kf, ki]
    uniq, counts = np.unique(kc, return_counts=True)
    tapset = {int(c): tuple(t for t in taps_all if (int(c) >> t) & 1) for c in uniq.tolist()}
    if exact:
        mapping = {ts: ts for ts in tapset.values()}
    else:
        mapping = _canonical_shapes({tapset[int(c)]: int(n) for c, n in zip(uniq, counts)}, taps_all, max_shapes)
    shapes = sorted(set(mapping.values()), key=lambda s: (len(s), s)) if len(kc) else []
    sidx = {s: j for j, s in enumerate(shapes)}
    code_shape = {c: sidx[mapping[ts]] for c, ts in tapset.items()}
    kshape = np.array([code_shape[c] for c in kc.tolist()], dtype=np.int64)
    shape_len = np.array([len(s) for s in shapes], dtype=np.int64)
    o = codes.shape[0]
    work = (np.bincount(kf, weights=shape_len[kshape], minlength=o).astype(np.int64) if len(kc)
            else np.zeros(o, np.int64))
    return kf, ki, kc, shapes, kshape, work


def plan_conv(op: ConvOp, in_shape: tuple[int, ...], out_shape: tuple[int, ...], blob: Blob, threads: int,
              lin: Layout | None = None, lout: Layout | None = None, vec: int = VEC,
              conv_mode: str = "auto", wide: bool = False, affinity: list[int] | None = None,
              rows_in: bool = False, opts: PlanOptions = DEFAULT_OPTIONS, merge_phases: bool = False) -> ConvPlan:
    """``affinity``: for a depthwise conv, the thread that wrote each input channel (filter-split producer);
    filter f then runs on that thread and reads its input from its own cache. ``rows_in``: the input was
    written split by rows (spatial producer); a depthwise conv then splits by rows too, so each thread reads
    the rows it wrote (and one halo row) instead of half of every channel from the other core's cache.
    ``opts``: the planner's knobs (PlanOptions). ``merge_phases``: plan a phase-lowered conv's kernels as the
    original ones (see PlanOptions.phase_merge); the caller keeps the plan only if it is flat."""
    if (not merge_phases and opts.phase_merge and op.tap_period > 1 and op.groups == 1 and lin is not None
            and op.weight.shape[1] % op.tap_period == 0):
        mark = blob.mark()
        p = plan_conv(op, in_shape, out_shape, blob, threads, lin, lout, vec, conv_mode, wide, affinity, rows_in,
                      opts, merge_phases=True)
        if p.flat and len(p.shapes) <= opts.max_shapes:
            return p
        blob.rewind(mark)
    w = op.weight.detach().float()
    o, ig, kh, kw = w.shape
    _, ho, wo = out_shape
    P = op.tap_period if merge_phases else 1
    ig //= P
    # an embedded kernel's structural zeros are never a tap: merged kernel shapes only add taps it has
    taps_all = tuple(range(P * kh * kw)) if P > 1 else op.taps()
    w9 = w.reshape(o, ig, P * kh * kw).numpy()
    # kernel list: (filter, input channel, tap set), filter-major; tap sets as bit codes (numpy: a 512x512
    # layer has 262k kernels, too many for per-kernel tensor ops)
    codes = _tap_codes(w9)
    # phase-lowered convs never run a tap the original kernel does not have (exact tap sets)
    kf, ki, kc, shapes, kshape, work = _kernel_shapes(codes, taps_all, op.tap_period > 1, opts.max_shapes)
    # (over the taps the kernel has: a dense dilated conv is dense)
    density = float(np.count_nonzero(w9)) / max(1, w9.shape[0] * w9.shape[1] * len(taps_all))
    blocked = (op.groups == 1 and (op.residual is None or op.res_kind == "identity") and lin is not None
               and (conv_mode == "blocked" or (conv_mode == "auto" and density >= (
                   opts.ochan_min_density if _ochan(opts, vec, wide) else opts.blocked_min_density))))
    # output position p reads input p + tap offset: stride 1, one row stride, an identity residual at most (an
    # unpadded conv's input is larger by the kernel's reach: a phase split's 2x2 conv)
    flat_ok = (lin is not None and lout is not None and op.stride == 1 and lin.rs == lout.rs
               and tuple(in_shape[1:]) == (ho + kh - 1 - 2 * op.padding, wo + kw - 1 - 2 * op.padding)
               and (op.residual is None or op.res_kind == "identity"))
    if (blocked and flat_ok and conv_mode == "auto" and kh == 1 and kw == 1 and op.groups == 1 and op.padding == 0
            and op.tap_period == 1 and ho * wo >= opts.flat_gemm_min_pixels
            and (_ochan32(opts, vec, wide) or (_ochan(opts, vec, wide) and opts.flat_gemm_narrow))
            and (lin.rs % (vec if _narrow(vec, wide) else 16) == 0
                 or op.weight.shape[1] <= opts.flat_gemm_unaligned_cin)):
        return _plan_flat_gemm(op, in_shape, out_shape, blob, lin, w9, work, len(kc), shapes, opts,
                               _narrow(vec, wide))
    if blocked and merge_phases:     # (not flat: the caller plans the phase channels instead)
        return ConvPlan(op, shapes, kh, ho, wo, 1, 1, 1)
    if blocked:     # dense weights of their own: the per-shape kernel lists below are not built
        return _plan_blocked(op, in_shape, out_shape, blob, threads, lin, vec, wide, w9, work, len(kc), shapes, opts)
    if (conv_mode == "auto" and op.groups == 1 and op.tap_period == 1 and lin is not None and len(kc)
            and (op.residual is None or op.res_kind == "identity") and _ochan32(opts, vec, wide)):
        ucodes = _block_codes(codes)
        nnz, need = np.count_nonzero(w9), opts.ochan_sparse_min_fill * 16
        # cheap test first (the blocks' exact taps; merged shapes only add taps), then the shapes the blocks run
        if nnz >= need * sum(int(np.count_nonzero(ucodes & (1 << t))) for t in range(kh * kw)):
            bf, bi, _, bshapes, bkshape, bwork = _kernel_shapes(ucodes, taps_all, False, opts.max_shapes)
            if nnz >= need * int(bwork.sum()):
                return _plan_ochan_sparse(op, out_shape, blob, threads, lin, w9, bf, bi, bshapes, bkshape, len(kc),
                                          int(work.sum()), opts)
    packed1 = (op.groups == 1 and kh == 1 and kw == 1 and op.padding == 0 and ho * wo <= opts.packed1_max
               and conv_mode != "direct")
    gather_ok = op.groups == 1 and op.padding <= 1 and kh <= 3 and kw <= 3
    gather_auto = ho * wo <= opts.gather_max and kh == 3 and kw == 3 and in_shape[0] >= opts.gather_min_cin
    gather = gather_ok and (conv_mode == "gather" or (conv_mode == "auto" and gather_auto))
    G = 1
    if op.groups == 1 and not packed1 and not gather and (op.residual is None or op.res_kind == "identity"):
        G = filter_group(codes, int(work.sum()), taps_all, opts.max_group, opts.fgroup_waste, opts.max_shapes)
    if G > 1:
        # filter groups: G adjacent filters share every kept kernel (channel_block pruning), so each input
        # vector loaded serves G filters; kernels are the group's (union of its filters' taps), weights
        # stored [kernel][tap][filter of the group]
        o = o // G
        codes = np.bitwise_or.reduce(codes.reshape(o, G, ig), axis=1)
        kf, ki, kc, shapes, kshape, work = _kernel_shapes(codes, taps_all, op.tap_period > 1, opts.max_shapes)
        work = work * G
        w9 = np.ascontiguousarray(w9.reshape(o, G, ig, w9.shape[2]).transpose(0, 2, 3, 1))   # (groups, cin, taps, G)
    # per shape: its kernels as arrays, filter-major (input channel ascending within a filter)
    per: list[KernelRuns] = []
    for j, s in enumerate(shapes):
        sel = np.nonzero(kshape == j)[0]
        fj = kf[sel]
        # grouped: filter f reads the ig input channels of its group (o / groups filters a group), depthwise the
        # one channel f; their phase channels (ig = channels x s*s) when phase-lowered
        chans = (fj // (o // op.groups)) * ig + ki[sel] if op.groups > 1 else ki[sel]
        wsel = w9[fj, ki[sel]][:, list(s)]
        per.append(KernelRuns(fj, chans, np.ascontiguousarray(wsel.reshape(len(sel), -1), dtype=np.float32), o))
    max_acc = opts.max_acc
    base_vec = vec
    if wide and vec == 8 and wo % 16 == 0 and not packed1 and not gather:
        # maps 16k pixels wide: 16-lane vectors (AVX-512) fill exactly, in the same padded layout; 32 registers
        vec, max_acc = 16, opts.max_acc_wide
    # Measured on CIFAR VGG-16/ResNet-56/MobileNetV2 (2-core AVX-512 Xeon): gather mode wins for 3x3 convs with
    # >= 128 input channels; with fewer channels packing and tile overheads dominate, and 1x1 convs lose to
    # in-register accumulation (one FMA per accumulator load/store).
    max_acc = max(1, max_acc // G)
    xv = math.ceil(wo / vec)
    vecs = max(d for d in range(1, min(xv, 4, max_acc) + 1) if xv % d == 0)
    rmax = max(1, max_acc // vecs)
    rows = max(d for d in range(1, min(ho, rmax) + 1) if ho % d == 0)
    p = ConvPlan(op, shapes, kh, ho, wo, rows, vecs, xv, vec=vec)
    p.chan_planes = P
    p.fgroup = G
    in_bytes = 4 * (lin.image if lin is not None else int(np.prod(in_shape)))
    w_bytes = 4 * int(work.sum() + len(kc))
    # (not depthwise: a filter is too little work, and the rows two threads write meet in shared cache lines)
    depthwise = op.groups > 1 and op.groups == o
    spatial = threads > 1 and ho >= 2 * threads and (
        (op.groups == 1 and in_bytes >= opts.spatial_ratio * w_bytes) or (depthwise and rows_in and opts.spatial_depthwise))
    # flat mode in tiles: 1x1 convs on any map, others on large inputs (see PlanOptions)
    tiling = opts.flat_tiled and not depthwise and (
        in_bytes >= opts.flat_tiled_min_bytes or (kh == 1 and kw == 1 and opts.flat_tiled_1x1))
    # AVX-512, rows of flat_tile_kxk vectors or more (224-wide maps): tiles of flat_tile_kxk_long_rows, past a row
    long_rows = (wide and lout is not None and opts.flat_tile_kxk_long_rows > 0 and
                 16 * opts.flat_tile_kxk <= lout.rs < 16 * opts.flat_tile_kxk_long_rows)
    wide_kxk = (bool(opts.flat_wide_kxk_min_width) and wo >= opts.flat_wide_kxk_min_width and tiling
                and lout is not None and (lout.rs < 16 * opts.flat_tile_kxk or long_rows))
    if (lin is not None and lout is not None and dw_rows_ok(op, in_shape[0], wo, opts, base_vec, wide)
            and (op.stride == 2 or not spatial)):
        p.dwrow, p.spatial = True, False
        p.rows = (max(1, min(ho, 16 // -(-wo // 16))) if op.stride == 1 else
                  max(1, min(ho, 8 // -(-wo // DW_CHUNK))))
        p.vecs = 1
        p.dw_w_off = blob.add_f(np.ascontiguousarray(w9.reshape(o, kh * kw), dtype=np.float32))
    elif packed1:
        p.packed1 = True
        p.gather_vec = 8 if ho * wo <= 8 or (_narrow(vec, wide) and opts.packed_narrow) else 16
        p.gather_pv = math.ceil(ho * wo / p.gather_vec)
    elif gather:
        p.gather = True
        p.gather_taps = tuple(sorted(set().union(*shapes))) if shapes else ()
        p.gather_vec = 8 if ho * wo <= 8 or (_narrow(vec, wide) and opts.packed_narrow) else 16
        p.gather_pv = math.ceil(ho * wo / p.gather_vec)
        acc_bytes = opts.gather_acc_bytes_narrow if _narrow(vec, wide) else opts.gather_acc_bytes
        p.gather_ft = max(1, acc_bytes // (4 * -(-p.gather_pv * p.gather_vec // 16) * 16))
        p.gather_inline = opts.gather_inline_pack
    elif (not (depthwise and spatial) and flat_ok and (lout.rs == wo + 2 or tiling)
            and (vec == base_vec or (opts.flat_wide and (kh * kw == 1 or wide_kxk)))):
        rs = lout.rs
        # tiles of 16-lane vectors on AVX-512 hosts (aligned loads for a 1x1 conv when rows are a multiple of 16);
        # a map that fits one block of registers (not tiled) keeps the plan's own width
        wide16 = tiling and opts.flat_wide and wide and base_vec == 8 and rs % 8 == 0
        # (not the 2x2 convs over a phase split: 1-2 taps per kernel, too few to pay for packing 4x the channels)
        rows2d = (tiling and kh >= 3 and kw >= 3 and op.stride == 1 and _narrow(base_vec, wide) and not wide16 and P == 1
                  and opts.flat_rows_narrow // G >= 4 and rs % base_vec == 0 and ho >= 2
                  and in_bytes <= opts.flat_rows_max_bytes)
        for fvec in ((16, base_vec) if wide16 else (base_vec,)):
            p0, nv = _flat_span(rs, ho, wo, fvec, 0 if kh == 1 or rows2d else
                                _busiest_column(shapes, kshape, kh, kw, op.padding) if opts.flat_align_column else None)
            tiled = nv > opts.max_acc // G and tiling
            if tiled:
                break
        if tiled or (nv <= opts.max_acc // G and vec == base_vec):
            vec = p.vec = fvec
            _set_flat(p, rs, p0, nv, blob)
            if tiled:
                # AVX-512 hosts have 32 vector registers (8-lane ones included): twice the accumulators
                one = opts.flat_tile_narrow if _narrow(vec, wide) else opts.flat_tile
                most = max(1, (opts.flat_tile_wide if wide and vec == base_vec else
                               one if kh * kw == 1 else
                               opts.flat_tile_kxk_long_rows if long_rows else opts.flat_tile_kxk) // G)
                p.flat_tv = -(-nv // -(-nv // most))      # balanced tiles: the shifted last one overlaps little
                ntiles = -(-nv // p.flat_tv)
                reach = ((kh - 1) // 2) * rs + (kw - 1) // 2      # taps' reach either side along the plane
                window = 4 * (p.flat_tv * vec + 2 * reach)        # bytes of one channel's tile input
                if rows2d:
                    jn = -(-(wo + 1) // vec)
                    p.flat_pack = opts.flat_pack_narrow and op.groups == 1
                    ncols = len({t % kw for sh in shapes for t in sh})
                    p.flat_rt, p.flat_tv = _flat_rows_shape(
                        ho, jn, max(1, opts.flat_rows_narrow // G), threads if spatial else 1, max(1, len(kc) // G),
                        in_shape[0] if p.flat_pack else 0, ncols, kh - 1)
                    p.flat_rv, p.flat_jn = rs // vec, jn
                    ntiles = -(-ho // p.flat_rt) * -(-jn // p.flat_tv)
                    # bytes of one channel's tile input: its packed copy, or the rows it spans
                    window = (4 * p.pack_geometry()[3] if p.flat_pack else
                              4 * (p.flat_rt + kh - 1) * (p.flat_tv * vec + 16))
                # threads take runs of tiles (all filters) rather than filter lists, when there is a tile per thread
                p.spatial = spatial and ntiles >= threads
                cin, window = in_shape[0] // P, window * P       # (a merged phase conv's channel: P planes)
                if opts.flat_cblock_bytes and op.groups == 1 and cin * window > opts.flat_cblock_bytes:
                    cb = max(1, opts.flat_cblock_bytes // window)
                    p.flat_ncb = -(-cin // cb)
                    p.flat_cb = -(-cin // p.flat_ncb)             # balanced blocks
    if not p.gather and not p.flat and not p.packed1 and op.groups == 1 and in_bytes >= opts.block_outer_ratio * w_bytes:
        p.block_outer = True
    if not p.gather and not p.flat and not p.packed1 and spatial:
        # at least one block of rows per thread
        p.rows = max(d for d in range(1, min(ho // threads, rmax) + 1) if ho % d == 0)
        p.spatial = p.ho // p.rows >= threads
    p.bias_off = blob.add_f(op.bias.numpy())
    # filter(-group)-kernel reorder + FLOP-balanced thread lists (LPT), each list in (work, signature) order
    counts = np.stack([r.count for r in per], 1).tolist() if per else [[] for _ in range(o)]
    sig = {f: tuple(counts[f]) for f in range(o)}
    order = sorted(range(o), key=lambda f: (-int(work[f]), sig[f], f))
    loads = [0] * threads
    lists: list[list[int]] = [[] for _ in range(threads)]
    for f in order:
        if depthwise and affinity is not None and len(affinity) == o:
            t = affinity[f]
        else:
            t = min(range(threads), key=lambda t: (loads[t], t))
        lists[t].append(f)
        loads[t] += int(work[f]) + 1   # +1: the epilogue of an empty filter still costs something
    tstart = [0]
    flist: list[int] = []
    for t in range(threads):
        flist += lists[t]
        tstart.append(len(flist))
    p.thread_of = [0] * (o * G)
    for t, lst in enumerate(lists):
        for f in lst:
            for g in range(G):
                p.thread_of[f * G + g] = t
    # runs stored in the order the threads walk them (position q in flist, not filter index): each thread then
    # streams its weights and channel indices sequentially, which the hardware prefetchers follow
    walk = np.array(flist if opts.runs_in_walk_order else range(o), dtype=np.int64)
    p.idx16 = opts.index16 and max(in_shape[0], o) <= 65536      # (gather mode's lists index filters)
    if p.flat and opts.merged_runs:
        _merge_runs(p, per, walk, blob)
    for r in ([] if p.merged else per):
        if p.gather:        # gather mode keeps its kernels in lists of its own (_plan_gather): none stored twice
            p.start_off.append(0)
            p.chan_off.append(0)
            p.w_off.append(0)
            continue
        idx = r.gather(walk)
        if p.flat_cb:
            # runs per (walk position, channel block): kernels are channel-ascending within a filter, so each
            # (position, block) run is contiguous
            posk = np.repeat(np.arange(len(walk)), r.count[walk])
            key = posk * p.flat_ncb + r.ch[idx] // p.flat_cb
            assert (np.diff(key) >= 0).all(), "kernels must be channel-ascending within a filter"
            cnt = np.bincount(key, minlength=len(walk) * p.flat_ncb) if len(idx) else np.zeros(
                len(walk) * p.flat_ncb, dtype=np.int64)
            p.start_off.append(blob.add_i(np.concatenate([[0], np.cumsum(cnt)])))
        else:
            p.start_off.append(blob.add_i(np.concatenate([[0], np.cumsum(r.count[walk])])))
        p.chan_off.append((blob.add_u16 if p.idx16 else blob.add_i)(r.ch[idx] if len(idx) else [0]))
        p.w_off.append(blob.add_f(r.w[idx].ravel() if len(idx) else [0.0]))
    p.tstart_off = blob.add_i(tstart)
    p.flist_off = blob.add_i(flist if flist else [0])
    if p.gather:
        _plan_gather(p, per, lists, in_shape[0], blob)
    p.kernels = len(kc) * G
    p.taps = int(work.sum())
    p.flops = 2 * p.taps * ho * wo
    return p




def _merge_runs(p: ConvPlan, per: list[KernelRuns], walk: np.ndarray, blob: Blob) -> None:
    """One kernel stream for every shape (PlanOptions.merged_runs): run u = (channel block, walk position) holds
    its kernels shape after shape, channel-ascending within a shape, runs in the order the threads walk them.
    ``merged_off``: starts per (run, shape) plus the total, so shape j of run u ends where the next begins;
    ``merged_woff``: each run's first weight (shapes have different tap counts)."""
    ncb = p.flat_ncb
    Q = len(walk)
    pos = np.empty(int(walk.max()) + 1 if Q else 0, dtype=np.int64)
    pos[walk] = np.arange(Q)
    ns = len(per)
    keys, chs, ws, lens = [], [], [], []
    for j, r in enumerate(per):
        if not len(r.f):
            continue
        blk = r.ch // p.flat_cb if p.flat_cb else np.zeros_like(r.ch)
        keys.append(((blk * Q + pos[r.f]) * ns + j) * (1 << 20) + r.ch)
        chs.append(r.ch)
        ws.append(r.w)
        lens.append(np.full(len(r.f), r.w.shape[1], dtype=np.int64))
    if keys:
        key = np.concatenate(keys)
        order = np.argsort(key, kind="stable")
        run_shape = (key // (1 << 20))[order]
        ch = np.concatenate(chs)[order]
        wl = np.concatenate(lens)[order]
        w = np.concatenate([x.ravel() for x in ws])
        wstart = np.concatenate([[0], np.cumsum(np.concatenate(lens))])[:-1]
        dst = np.concatenate([[0], np.cumsum(wl)])[:-1]
        w = w[np.repeat(wstart[order] - dst, wl) + np.arange(int(wl.sum()))]
    else:
        run_shape, ch, wl, w = np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(1)
    n_rs = ncb * Q * ns
    cnt = np.bincount(run_shape, minlength=n_rs)
    starts = np.concatenate([[0], np.cumsum(cnt)])
    wcum = np.concatenate([[0], np.cumsum(wl)])
    p.merged = True
    p.merged_off = blob.add_i(starts)
    p.merged_woff = blob.add_i(wcum[starts[:-1:ns]] if n_rs else [0])
    p.merged_ch_off = (blob.add_u16 if p.idx16 else blob.add_i)(ch if len(ch) else [0])
    p.merged_w_off = blob.add_f(w if len(w) else [0.0])


DW_CHUNK = 14        # output columns per vector of a stride-2 depthwise row (lane x reads columns up to 2x + 4 < 32)


def dw_rows_ok(op: ConvOp, cin: int, wo: int, opts: PlanOptions, vec: int, wide: bool) -> bool:
    """Whether depthwise row mode (ConvPlan.dwrow) runs ``op``: a depthwise (one channel per filter) k x k conv
    with "same" padding on AVX-512: 3x3 stride 1 on maps small_w < wo <= dw_rows_s1_max_width, 3x3 / 5x5 stride 2
    with outputs at most dw_rows_s2_max_width wide. ``lower`` leaves those 5x5 ones unsplit (plan_conv must then
    take them: direct mode reads at most a one-pixel border)."""
    o, ig, kh, kw = op.weight.shape
    if not (opts.dw_rows and wide and op.groups == cin == o and ig == 1 and kh == kw and op.padding == kh // 2
            and op.tap_period == 1 and op.embed is None and (op.residual is None or op.res_kind == "identity")):
        return False
    if op.stride == 1:
        return kh == 3 and small_w(vec) < wo <= opts.dw_rows_s1_max_width
    return op.stride == 2 and kh in (3, 5) and wo <= opts.dw_rows_s2_max_width


def filter_group(codes: np.ndarray, own_taps: int, taps_all: tuple[int, ...], max_group: int, waste: float,
                 max_shapes: int) -> int:
    """The largest G in (4, 2), at most ``max_group``, such that running G adjacent filters as one group on the
    union of their kernels costs at most ``waste`` x the taps the filters run alone; 1 if none.
    channel_block pruning makes groups exact; unstructured or pattern-per-filter layers stay at 1."""
    o, ig = codes.shape
    if own_taps == 0:
        return 1
    for G in (4, 2):
        if G > max_group or o % G:
            continue
        union = np.bitwise_or.reduce(codes.reshape(o // G, G, ig), axis=1)
        nz = union[union != 0]
        if len(nz) == 0 or G * len(nz) > waste * np.count_nonzero(codes):
            continue        # the group runs more kernels than its filters would: not shared (cheap test first)
        uniq, counts = np.unique(nz, return_counts=True)
        freq = {tuple(t for t in taps_all if (int(c) >> t) & 1): int(n) for c, n in zip(uniq, counts)}
        canon = _canonical_shapes(freq, taps_all, max_shapes)
        cost = G * sum(len(canon[ts]) * n for ts, n in freq.items())
        if cost <= waste * own_taps:
            return G
    return 1


def _se_scale(graph: Graph, k: int, c: ConvPlan, producer: dict, readers: dict, layouts: dict) -> int | None:
    """The squeeze-excite multiply conv ``k`` can take in (see ``ConvPlan.in_scale``), or None: its input is
    x * gate with gate (C, 1, 1) per image, read by this conv only, and only as its input (a fused residual
    reads the stored product, which fusing never stores); the conv runs dense output-channel blocks
    with a 1x1 kernel and no padding (so it never reads a border lane, where 0 x an infinite gate would give
    NaN and PyTorch's padded product gives 0), and x has the product's layout."""
    op = graph.ops[k]
    v = op.inputs[0]
    m = producer.get(v)
    if m is None or not (c.blocked and c.blk_ochan and not c.blk_sparse) or v in graph.outputs:
        return None
    mul = graph.ops[m]
    if not (isinstance(mul, EltwiseOp) and mul.fn == "mul" and len(mul.inputs) == 2 and mul.native):
        return None
    x, gate = mul.inputs
    if (tuple(graph.values[gate].shape) != (graph.values[v].shape[0], 1, 1) or x == gate
            or tuple(graph.values[x].shape) != tuple(graph.values[v].shape) or layouts[x] != layouts[v]
            or [r for r in readers.get(v, []) if r is not op] or op.residual == v
            or op.weight.shape[2:] != (1, 1) or op.padding
            or op.groups != 1):
        return None
    return m


def _ochan_1x1_vecs(o: int, cin: int, ho: int, wo: int, acc: int) -> int:
    """Vectors of 16 filters per output-channel block of a dense 1x1 conv: the fewest estimated cycles. Per block
    and input channel, nv x R x V FMAs (one a cycle) or nv weight loads (streamed) + R x V broadcasts (two a
    cycle), whichever bounds; per block, a 16x16 transpose per vector and 16 pixels (~64 shuffles) and a store
    per filter and row; blocks counted with the last partial block of filters and the shifted-back pixels."""
    def cycles(nv: int) -> float:
        V, R = _ochan_rows(ho, wo, acc // nv)
        blocks = -(-o // (16 * nv)) * -(-ho // R) * -(-wo // V)
        per_channel = max(nv * R * V, nv + 0.5 * R * V)
        return blocks * (cin * per_channel + nv * -(-(R * V) // 16) * 64 + 16 * nv * R)
    return min((1, 2, 4), key=lambda nv: (cycles(nv), -nv))


def _ochan_rows(ho: int, wo: int, pix: int, vmax: int = 16) -> tuple[int, int]:
    """Pixels (V, at most ``vmax``) and rows (R) of an output-channel block of at most ``pix`` accumulators: the
    fewest recomputed (shifted-back) pixels, then the most per block."""
    V = min(range(1, min(wo, pix, vmax) + 1), key=lambda v: (-(-wo // v) * (v + 1.0), -v))
    R = min(range(1, min(ho, pix // V) + 1), key=lambda r: (-(-ho // r) * (r + 0.5), -r))
    return V, R


def _plan_ochan_sparse(op: ConvOp, out_shape, blob: Blob, threads: int, lin: Layout, w9: np.ndarray,
                       bf: np.ndarray, bi: np.ndarray, shapes: list, bkshape: np.ndarray, kernels: int, taps: int,
                       opts: PlanOptions) -> ConvPlan:
    """Output-channel vectors over the kept kernels of each block of 16 filters (``ConvPlan.blk_sparse``):
    per block, its kernels grouped by tap shape, channels ascending; weights [block][kernel][tap][16 filters],
    zero for a filter of the block that lacks the tap (multiplied, as PyTorch multiplies every zero)."""
    o, cin, kk = w9.shape
    _, ho, wo = out_shape
    nb = -(-o // 16)
    per_block = np.bincount(bf, weights=np.array([len(shapes[j]) for j in bkshape]), minlength=nb)
    V, R = _ochan_rows(ho, wo, opts.ochan_acc, opts.ochan_sparse_vmax)
    if wo >= 16 and per_block.mean() <= opts.ochan_row_max_work:
        V, R = 16, 1
    p = ConvPlan(op, shapes, int(op.weight.shape[2]), ho, wo, R, V, wo)
    wpad = np.zeros((nb * 16, cin, kk), dtype=np.float32)
    wpad[:o] = w9
    ns = len(shapes)
    order = np.lexsort((bi, bkshape, bf))                  # block, then shape, then channel
    cnt = np.zeros((nb, ns), dtype=np.int64)
    np.add.at(cnt, (bf, bkshape), 1)
    chans = bi[order]
    # each kept kernel's weights as [tap of its shape][16 filters], in walk order
    wk = wpad.reshape(nb, 16, cin, kk).transpose(0, 2, 3, 1)[bf[order], chans]       # (kernels, kk, 16)
    in_shape = np.zeros((ns, kk), dtype=bool)
    for j, sh in enumerate(shapes):
        in_shape[j, list(sh)] = True
    ws = wk[in_shape[bkshape[order]]]                                               # taps ascending per kernel
    wst = np.concatenate([[0], np.cumsum(16 * per_block)[:-1]]).astype(np.int64)
    kst = np.concatenate([[0], np.cumsum(cnt.sum(1))[:-1]]).astype(np.int64)
    bias = np.zeros(nb * 16, dtype=np.float32)
    bias[:o] = op.bias.numpy()
    p.blocked, p.blk_ochan, p.blk_sparse, p.blk_f, p.blk_nb = True, True, True, 16, nb
    p.blk_w_off = blob.add_f(ws, align=16)
    p.blk_b_off = p.bias_off = blob.add_f(bias, align=16)
    p.blk_cnt_off, p.blk_ch_off = blob.add_i(cnt.ravel()), blob.add_i(chans)
    p.blk_kst_off, p.blk_wst_off = blob.add_i(kst), blob.add_i(wst)
    p.block_outer = 4 * lin.image >= opts.block_outer_ratio * 4 * (ws.size + len(chans))
    p.spatial = threads > 1 and p.block_outer and ho >= 2 * threads * R
    p.kernels, p.taps = kernels, taps
    p.flops = 2 * 16 * int(per_block.sum()) * ho * wo     # every lane of every block's vectors is multiplied
    return p


def _tap_codes(w9: np.ndarray) -> np.ndarray:
    """Each kernel's kept taps as a bit mask: (filters, channels, taps) weights -> (filters, channels) codes."""
    return ((w9 != 0) * (np.int64(1) << np.arange(w9.shape[-1], dtype=np.int64))).sum(-1)


def _block_codes(codes: np.ndarray) -> np.ndarray:
    """Tap-set codes (filter x channel bit masks) of blocks of 16 filters: the union of their filters'."""
    o, ig = codes.shape
    nb = -(-o // 16)
    u = np.zeros((nb * 16, ig), dtype=np.int64)
    u[:o] = codes
    return np.bitwise_or.reduce(u.reshape(nb, 16, ig), axis=1)


def _blocks_share_kernels(weight: torch.Tensor, opts: PlanOptions) -> bool:
    """The cheap half of the output-channel sparse mode's test (plan_conv): blocks of 16 filters whose kernels
    and taps are shared well enough (channel_block pruning) for that mode, which runs stride 2 itself."""
    w9 = weight.detach().reshape(weight.shape[0], weight.shape[1], -1).numpy()
    u = _block_codes(_tap_codes(w9))
    taps = sum(int(np.count_nonzero(u & (1 << t))) for t in range(w9.shape[2]))
    return np.count_nonzero(w9) >= opts.ochan_sparse_min_fill * 16 * taps


def _ochan(opts: PlanOptions, vec: int, wide: bool) -> bool:
    """Blocked convs use output-channel vectors of 16 filters: with AVX-512's registers, or on AVX2 as two 8-lane
    halves and fewer pixels per block (``_narrow``)."""
    return opts.blocked_ochan and (wide or vec == 16 or opts.ochan_narrow)


def _ochan32(opts: PlanOptions, vec: int, wide: bool) -> bool:
    """The output-channel modes built for 32 registers only (16-lane flat GEMM, channel-block sparse blocks)."""
    return _ochan(opts, vec, wide) and not _narrow(vec, wide)


def _narrow(vec: int, wide: bool) -> bool:
    """16 vector registers (AVX2 hosts and portable builds): a 16-filter vector takes two of them."""
    return vec == 8 and not wide


def _plan_blocked(op: ConvOp, in_shape, out_shape, blob: Blob, threads: int, lin: Layout, vec: int, wide: bool,
                  w9: np.ndarray, work: np.ndarray, kernels: int, shapes: list, opts: PlanOptions) -> ConvPlan:
    """Register blocks of blocked_f filters x rows x vectors (12 accumulators, 24 with AVX-512's 32 registers);
    the last row and vector blocks are shifted back to end at the map's edge (their overlap is recomputed to
    the same values). Loop order as direct mode's ``block_outer``: spatial blocks outside filter blocks when the
    input outweighs the weights (the block's input window stays in L1 for every filter block), else filter
    blocks outside (each block's weights read once). Batch 1 splits rows (block outer) or filter blocks."""
    o, cin, kk = w9.shape
    _, ho, wo = out_shape
    ochan, narrow = _ochan(opts, vec, wide), _narrow(vec, wide)
    if ochan and narrow and (cin * kk <= opts.ochan_row_max_work
                             or (kk > 1 and cin * kk <= opts.blocked_kxk_max_work_narrow)):
        # few weights per pixel (an RGB stem, a 16-channel 3x3 conv): 16-register hosts have no registers for a
        # row of 16 pixels transposed in registers, and the per-element epilogue would cost more than the FMAs;
        # pixel vectors
        ochan = False
    if ochan:
        # 16 filters per vector (AVX-512 registers, also in an 8-lane plan); pixels per row block: the fewest
        # recomputed (shifted-back) pixels, then the most per block
        vrow = wo >= 16 and cin * kk <= opts.ochan_row_max_work and not narrow
        if narrow:
            nv = 1
        elif kk == 1 and not vrow:
            nv = opts.ochan_vecs_1x1 or _ochan_1x1_vecs(o, cin, ho, wo, opts.ochan_acc_1x1)
            nv = max(1, min(nv, -(-o // 16)))
        else:
            nv = 1
        F, xv = 16 * nv, wo
        acc = ((opts.ochan_acc_1x1_narrow if kk == 1 else opts.ochan_acc_narrow) if narrow else
               opts.ochan_acc_1x1 // nv if kk == 1 else opts.ochan_acc)
        V, R = (16, 1) if vrow else _ochan_rows(ho, wo, acc)
    else:
        budget = opts.blocked_acc_wide if wide else opts.blocked_acc
        F = min(opts.blocked_f_narrow if narrow else opts.blocked_f, o)
        xv = math.ceil(wo / vec)
        rv = max(1, budget // F)
        # vectors and rows per block: least recomputed work (shifted-back last blocks) plus a per-block cost
        V = min(range(1, min(xv, rv) + 1), key=lambda v: (-(-xv // v) * (v + 1.0), -v))
        R = min(range(1, min(ho, rv // V) + 1), key=lambda r: (-(-ho // r) * (r + 0.5), -r))
    p = ConvPlan(op, shapes, int(op.weight.shape[2]), ho, wo, R, V, xv, vec=vec)
    p.blk_ochan = ochan
    p.blk_lanes = 8 if ochan and narrow else 16
    nb = -(-o // F)
    wpad = np.zeros((nb * F, cin, kk), dtype=np.float32)
    wpad[:o] = w9
    # [block][channel][tap][filter in block]
    packed = wpad.reshape(nb, F, cin, kk).transpose(0, 2, 3, 1)
    bias = np.zeros(nb * F, dtype=np.float32)
    bias[:o] = op.bias.numpy()
    p.blocked, p.blk_f, p.blk_nb = True, F, nb
    # taps per channel phase: those non-zero in some filter for some channel of the phase (a phase-lowered
    # conv's structural zeros are never multiplied; with tap_period 1, every tap of every channel, an embedded
    # kernel's own taps only)
    g = op.tap_period if cin % op.tap_period == 0 else 1
    nzt = (w9 != 0).any(0)                                     # (cin, kk)
    p.blk_taps = [tuple(int(t) for t in np.nonzero(nzt[r::g].any(0))[0]) if g > 1 else op.taps()
                  for r in range(g)]
    p.blk_w_off = blob.add_f(packed, align=16)
    p.blk_b_off = p.bias_off = blob.add_f(bias, align=16)
    in_bytes = 4 * lin.image
    p.block_outer = in_bytes >= opts.block_outer_ratio * 4 * wpad.size
    p.spatial = threads > 1 and p.block_outer and ho >= 2 * threads * R
    if not p.spatial:
        # batch 1 splits filter blocks in contiguous runs (_blocked_head): which thread wrote each channel, for
        # a depthwise conv or element-wise op that reads it next (RepGhostNet's dense 1x1 -> depthwise 3x3
        # pairs otherwise sent half of every map across cores)
        p.thread_of = [t for t in range(threads) for _ in range(nb * t // threads * F, nb * (t + 1) // threads * F)][:o]
    p.kernels = kernels
    p.taps = int(work.sum())
    p.flops = 2 * o * cin * kk * ho * wo          # every weight is multiplied, zero or not
    return p


def _flat_rows_shape(ho: int, jn: int, acc: int, threads: int = 1, kernels: int = 0, cin: int = 0,
                     cols: int = 3, reach: int = 2) -> tuple[int, int]:
    """2-D flat tiles' (rows, vectors per row) for a map of ``ho`` rows of ``jn`` vectors, at most ``acc``
    accumulators: the fewest estimated cycles over the map. Per kernel and tile a 4-of-9 pattern costs about
    tv * (4 rt + 1) / 2 cycles (two single-tap columns at a load per FMA, half of them split across cache
    lines, and a two-tap column sharing rows: loads-bound) plus ~6 of set-up (index, pointer, broadcasts); tiles
    that do not divide the map are shifted back and recompute the overlap. It ranked the measured best first on
    28x28, 56x56 and 112x112 layers (Zen 4 built for AVX2, one thread, unpacked, shapes 6x2, 4x3, 3x4, 2x6), and
    with packing picks 12x1 on 64->64 at 56x56 (2 threads, in-network: 1.13x of tiles along the plane; 6x2
    1.11x, 3x4 1.11x) and 4x3 on 128->128 at 112x112 (1.16x; 6x2 1.09x, 3x4 1.06x). ``threads``
    split the tiles (1: they split filters): a thread's share is whole tiles. Fewer than 8 accumulators leave
    the FMA chains latency-bound, so smaller tiles only where the map is smaller. Packed tiles add a cycle per
    vector copied (``cin`` channels x ``cols`` kernel columns x the tile's rows + ``reach`` x its vectors),
    shared by the ``kernels`` kept kernels."""
    best = None
    for rt in range(min(ho, acc), 1, -1):
        most = acc // rt
        tv = -(-jn // -(-jn // most))                # balanced vectors per tile row
        if rt * tv < min(8, acc, ho * jn):
            continue
        tiles = -(-ho // rt) * -(-jn // tv)
        per_tile = kernels * (tv * (4 * rt + 1) / 2 + 6) + cin * cols * (rt + reach) * tv
        cost = (-(-tiles // threads) if tiles >= threads else tiles / threads) * per_tile
        if best is None or cost < best[0]:
            best = (cost, rt, tv)
    if best is None:            # a map of fewer than 8 vectors: one tile
        return ho, jn
    return best[1], best[2]


def _busiest_column(shapes: list, kshape: np.ndarray, kh: int, kw: int, pad: int) -> int:
    """Column offset (kx - pad) of the kernel column with the most taps over the layer's kernels."""
    per_shape = np.bincount(kshape, minlength=len(shapes)) if len(kshape) else np.zeros(len(shapes), np.int64)
    cols = np.zeros(kw, np.int64)
    for s, n in zip(shapes, per_shape.tolist()):
        for t in s:
            cols[(t % (kh * kw)) % kw] += n
    return int(np.argmax(cols)) - pad


def _flat_span(rs: int, ho: int, wo: int, vec: int, dx: int | None) -> tuple[int, int]:
    """Flat modes' range along the padded plane: first position and vectors up to the last interior position.
    When rows are whole vectors the span starts where the taps of column offset ``dx`` load aligned vectors (1x1
    convs: dx 0, the row's left border), up to vec - 1 positions before the first interior one, in border lanes
    masked like any other; ``dx`` None: at the first interior position."""
    p0 = rs + 1 - (1 + dx) % vec if dx is not None and rs % vec == 0 else rs + 1
    return p0, math.ceil((ho * rs + wo - p0 + 1) / vec)


def _set_flat(p: ConvPlan, rs: int, p0: int, nv: int, blob: Blob) -> None:
    """Mark ``p`` flat over ``nv`` vectors of ``p.vec`` lanes from ``p0``, with the border lanes' masks."""
    pos = p0 + np.arange(nv * p.vec).reshape(nv, p.vec)
    masks = (pos // rs >= 1) & (pos // rs <= p.ho) & (pos % rs >= 1) & (pos % rs <= p.wo)
    p.flat, p.flat_p0, p.flat_nv, p.flat_mask_off = True, p0, nv, blob.add_mask(masks)


def _plan_flat_gemm(op: ConvOp, in_shape, out_shape, blob: Blob, lin: Layout, w9: np.ndarray, work: np.ndarray,
                    kernels: int, shapes: list, opts: PlanOptions, narrow: bool = False) -> ConvPlan:
    """Dense 1x1 conv as a GEMM along the flattened padded plane (16-lane vectors on 32-register hosts, 8-lane
    ones and a smaller block on ``narrow`` 16-register hosts): per item
    (a tile of gemm_nr vectors x a block of gemm_mr filters) every input channel's tile vectors are loaded once and
    feed gemm_mr broadcast weights, the accumulators go straight to the planar output with border lanes masked.
    No transpose, no per-element epilogue (blocked output-channel mode's cost on maps with few channels), no
    kernel lists (every weight is multiplied)."""
    o, cin, _ = w9.shape
    _, ho, wo = out_shape
    rs, VEC = lin.rs, 8 if narrow else 16
    p = ConvPlan(op, shapes, 1, ho, wo, 1, 1, math.ceil(wo / VEC), vec=VEC)
    _set_flat(p, rs, *_flat_span(rs, ho, wo, VEC, 0), blob)
    nv = p.flat_nv
    p.flat_tv = min(nv, opts.gemm_nr_narrow if narrow else opts.gemm_nr)
    mr = p.gemm_mr = opts.gemm_mr_narrow if narrow else opts.gemm_mr
    nb = -(-o // mr)
    wpad = np.zeros((nb * mr, cin), dtype=np.float32)
    wpad[:o] = w9[:, :, 0]
    p.flat_gemm = True
    p.gemm_w_off = blob.add_f(wpad.reshape(nb, mr, cin).transpose(0, 2, 1), align=16)   # [block][channel][filter]
    p.bias_off = blob.add_f(op.bias.numpy())
    p.kernels = kernels
    p.taps = int(work.sum())
    p.flops = 2 * o * cin * ho * wo          # every weight is multiplied, zero or not
    return p


def _plan_gather(p: ConvPlan, per: list[KernelRuns], lists: list[list[int]], cin: int, blob: Blob) -> None:
    """Tiles of filters per thread; within a tile, kernels ordered by (input channel, shape, filter position)
    in one stream of filters and one of weights: the loop walks them in that order, so the prefetchers follow
    two sequential streams (with a stream per shape, 16 streams advanced a few entries at a time, weights that
    did not fit the cache arrived at a fraction of the memory bandwidth)."""
    ns = len(p.shapes)
    tile0, tf, fl, te = [0], [0], [], []
    cnt: list[np.ndarray] = []
    ef: list[np.ndarray] = []
    ew: list[np.ndarray] = []
    ne = nw = 0
    o = 1 + max((f for lst in lists for f in lst), default=0)
    for lst in lists:
        for a in range(0, len(lst), p.gather_ft):
            tile = lst[a:a + p.gather_ft]
            fl += tile
            tf.append(len(fl))
            te += [ne, nw]
            pos = np.full(o, -1, dtype=np.int64)
            pos[np.array(tile, dtype=np.int64)] = np.arange(len(tile))
            c = np.zeros((cin, ns), dtype=np.int64)
            keys, fs, ws = [], [], []
            for j, r in enumerate(per):
                idx = r.gather(np.array(tile, dtype=np.int64))
                c[:, j] = np.bincount(r.ch[idx], minlength=cin)
                keys.append((r.ch[idx] * ns + j) * len(tile) + pos[r.f[idx]])
                fs.append(r.f[idx])
                ws.append(r.w[idx])
            if keys:
                key = np.concatenate(keys)
                order = np.argsort(key, kind="stable")
                f_all = np.concatenate(fs)[order]
                lens = np.concatenate([np.full(len(w_), w_.shape[1], dtype=np.int64) for w_ in ws])
                w_flat = np.concatenate([w_.ravel() for w_ in ws])
                wst = np.concatenate([[0], np.cumsum(lens)])[:-1]
                L = lens[order]
                # each entry's weights, in entry order: its start, then consecutive positions
                idx = np.repeat(wst[order] - np.concatenate([[0], np.cumsum(L)])[:-1], L) + np.arange(int(L.sum()))
                ef.append(f_all)
                ew.append(w_flat[idx])
                ne += len(f_all)
                nw += int(lens.sum())
            cnt.append(c.ravel())
        tile0.append(len(tf) - 1)
    p.gather_tile0_off = blob.add_i(tile0)
    p.gather_tf_off = blob.add_i(tf)
    p.gather_fl_off = blob.add_i(fl or [0])
    p.gather_cnt_off = blob.add_i(np.concatenate(cnt) if cnt else [0])
    p.gather_te_off = blob.add_i(te or [0])
    p.gather_ef_off = (blob.add_u16 if p.idx16 else blob.add_i)(np.concatenate(ef) if ne else [0])
    p.gather_ew_off = blob.add_f(np.concatenate(ew) if nw else [0.0])


@dataclasses.dataclass
class Plan:
    graph: Graph
    layouts: dict[int, Layout]
    convs: dict[int, ConvPlan]            # by op index
    other: dict[int, dict]                # offsets for linear etc.
    blob: Blob
    threads: int
    segments: list[tuple[str, list[int]]]  # ("native", [op idx...]) or ("torch", [op idx])
    vec: int = VEC
    scratch: int = 0                      # floats of scratch memory (gather mode), independent of the batch
    scratch_id: int = 0                   # its index in the buffer table (after every value id)
    blocks: dict = dataclasses.field(default_factory=dict)     # fused blocks by their first op (BlockPlan)
    bands: dict = dataclasses.field(default_factory=dict)      # fused expand + depthwise pairs by their first op
    absorbed: dict = dataclasses.field(default_factory=dict)   # op index -> the fused block op that runs it
    aliases: dict = dataclasses.field(default_factory=dict)    # value -> (outermost concatenation, first channel)
    options: PlanOptions = DEFAULT_OPTIONS                      # the knobs it was planned with (codegen reads them)
    # 16 vector registers (AVX2 and portable builds): packed rows in 8-lane vectors, fewer independent chains
    narrow: bool = False

    def gather_size(self, k: int) -> int:
        """Floats of scratch memory conv ``k`` needs, whatever the batch: per thread, one image's packed rows
        and accumulators for every filter."""
        c = self.convs[k]
        ps = c.gather_pv * c.gather_vec
        cin = self.graph.values[c.op.inputs[0]].shape[0]
        if c.packed1:
            return self.threads * cin * ps
        acc_stride = -(-ps // 16) * 16
        packed = (1 if c.gather_inline else cin) * len(c.gather_taps) * ps
        return self.threads * (packed + c.op.weight.shape[0] * acc_stride)

    def partials_size(self, k: int) -> int:
        """Floats of scratch a channel-blocked or packed flat-tiled conv needs: per thread, one tile of partial
        sums for every filter (channel blocks), then the tile's packed input (a channel block's, or every channel)."""
        c = self.convs[k]
        return self.threads * c.scratch_floats()




@dataclasses.dataclass
class BlockPlan:
    """An inverted-residual block (1x1 expand -> 3x3 depthwise s1 -> 1x1 project, maps of <= packed1_max
    pixels) run as one op. At batch 1, layer by layer, every 1x1 layer reads all channels, half of them written
    by the other core, and every output line was last read by the other core: measured on MobileNetV2 (2-core
    Xeon, network-order profile), those transfers doubled the time of the small-map layers. Fused, each thread
    expands and filters its own share of the expanded channels into private memory (never materialised in
    the network's buffers), computes the project layer's partial sums over them, and the threads then add up
    the partials of their share of output channels: only the block input and the partial sums cross cores.
    Packed rows as in packed 1x1 mode (``ConvPlan.packed1``); the depthwise taps are shifted loads from the
    packed expanded row with 0/1 masks for the map's edges."""

    a: int                                # op indices: expand, depthwise, project
    b: int
    c: int
    cin: int
    mid: int
    cout: int
    ho: int
    wo: int
    G: int                                # lanes
    PV: int                               # vectors per map
    M: int                                # zero margin (floats) before and after the packed expanded row
    max_e: int                            # most expanded channels in one partition
    offs: dict = dataclasses.field(default_factory=dict)
    flops: int = 0

    @property
    def PS(self) -> int:
        return self.PV * self.G

    def private(self, threads: int) -> int:
        """Floats of scratch per thread: packed input, expanded row with margins, filtered rows, own partials."""
        return self.cin * self.PS + (self.PS + 2 * self.M) + self.max_e * self.PS + threads * self.cout * self.PS

    def scratch(self, threads: int) -> int:
        """Private areas, and shared partial sums for each image left over after whole rounds (< threads)."""
        return threads * self.private(threads) + max(1, threads - 1) * threads * self.cout * self.PS


def fusable_blocks(graph: Graph, packed1_max: int = DEFAULT_OPTIONS.packed1_max,
                   max_density: float = 1.01) -> list[tuple[int, int, int]]:
    """Consecutive (expand, depthwise, project) triples the fused block kernel supports, whose 1x1 convs are
    sparser than ``max_density`` (denser ones run faster in blocked mode, each on its own: dense MobileNetV2 at
    224, one thread, Xeon AVX-512: 8.69 ms fused vs 7.75 unfused, RepGhostNet 3.90 vs 3.60; 8x pattern
    MobileNetV2 4.47 vs 4.57)."""
    out = []
    used = {v for v in graph.outputs}
    k = 0
    ops = graph.ops
    while k + 2 < len(ops):
        a, b, c = ops[k], ops[k + 1], ops[k + 2]
        ok = (all(isinstance(x, ConvOp) and x.native for x in (a, b, c))
              and a.weight.shape[2:] == (1, 1) and a.groups == 1 and a.stride == 1 and a.padding == 0
              and a.residual is None
              and b.inputs[0] == a.output and b.weight.shape[2:] == (3, 3) and b.stride == 1 and b.padding == 1
              and b.embed is None and b.groups == b.weight.shape[0] == a.weight.shape[0] and b.weight.shape[1] == 1
              and b.residual is None
              and c.inputs[0] == b.output and c.weight.shape[2:] == (1, 1) and c.groups == 1 and c.stride == 1
              and c.padding == 0 and (c.residual is None or c.res_kind == "identity")
              and a.output not in used and b.output not in used
              and len(graph.users(a.output)) == 1 and len(graph.users(b.output)) == 1)
        if ok:
            ok = all(float(np.count_nonzero(x.weight.detach().numpy())) < max_density * x.weight.numel()
                     for x in (a, c))
        if ok:
            _, ho, wo = graph.values[c.output].shape
            ok = ho * wo <= packed1_max and tuple(graph.values[a.inputs[0]].shape[1:]) == (ho, wo)
        if ok:
            out.append((k, k + 1, k + 2))
            k += 3
        else:
            k += 1
    return out


def _expand_depthwise_lists(wa: torch.Tensor, wb: torch.Tensor, order) -> tuple[list, ...]:
    """Per expanded channel e in ``order``: its expand kernel list (input channels and weights of the non-zero
    1x1 weights, run e in [a_st[i], a_st[i+1])) and its depthwise tap list (taps 0..8 and weights): what a fused
    block or band reads, channel by channel."""
    a_st, a_ch, a_w, b_st, b_tap, b_w = [0], [], [], [0], [], []
    for e in order:
        nz = wa[e].nonzero().flatten().tolist()
        a_ch += nz
        a_w += wa[e, nz].tolist()
        a_st.append(len(a_ch))
        tz = wb[e].nonzero().flatten().tolist()
        b_tap += tz
        b_w += wb[e, tz].tolist()
        b_st.append(len(b_tap))
    return a_st, a_ch, a_w, b_st, b_tap, b_w


def plan_block(graph: Graph, trip: tuple[int, int, int], blob: Blob, threads: int, narrow: bool = False) -> BlockPlan:
    ka, kb, kc = trip
    A, Bc, C = graph.ops[ka], graph.ops[kb], graph.ops[kc]
    wa = A.weight.detach().float().reshape(A.weight.shape[0], -1)          # (mid, cin)
    wb = Bc.weight.detach().float().reshape(Bc.weight.shape[0], 9)         # (mid, 9)
    wc = C.weight.detach().float().reshape(C.weight.shape[0], -1)          # (cout, mid)
    mid, cin = wa.shape
    cout = wc.shape[0]
    _, ho, wo = graph.values[C.output].shape
    G = 8 if ho * wo <= 8 or narrow else 16
    PV = math.ceil(ho * wo / G)
    # expanded channels: LPT over (expand taps + depthwise taps + project taps), biggest first
    work = (wa != 0).sum(1) + (wb != 0).sum(1) + (wc != 0).sum(0) + 1
    loads = [0] * threads
    parts: list[list[int]] = [[] for _ in range(threads)]
    for e in sorted(range(mid), key=lambda e: (-int(work[e]), e)):
        t = min(range(threads), key=lambda t: (loads[t], t))
        parts[t].append(e)
        loads[t] += int(work[e])
    walk = [e for p in parts for e in p]
    estart = [0]
    for p in parts:
        estart.append(estart[-1] + len(p))
    a_st, a_ch, a_w, b_st, b_tap, b_w = _expand_depthwise_lists(wa, wb, walk)
    c_st, c_ix, c_w = [], [], []
    for t, p in enumerate(parts):
        for o in range(cout):
            c_st.append(len(c_ix))
            for li, e in enumerate(p):
                if wc[o, e] != 0:
                    c_ix.append(li)
                    c_w.append(float(wc[o, e]))
        c_st.append(len(c_ix))
    PS = PV * G
    masks = np.zeros((9, PS), bool)
    for tp in range(9):
        dy, dx = tp // 3 - 1, tp % 3 - 1
        for q in range(ho * wo):
            y, x = divmod(q, wo)
            masks[tp, q] = 0 <= y + dy < ho and 0 <= x + dx < wo
    M = -(-(wo + 1) // 16) * 16
    bp = BlockPlan(ka, kb, kc, cin, mid, cout, ho, wo, G, PV, M, max(len(p) for p in parts))
    bp.offs = {
        "estart": blob.add_i(estart), "a_st": blob.add_i(a_st), "a_ch": blob.add_i(a_ch or [0]),
        "a_w": blob.add_f(a_w or [0.0]), "a_b": blob.add_f(A.bias.numpy()[walk]),   # biases in walk order
        "b_st": blob.add_i(b_st), "b_tap": blob.add_i(b_tap or [0]), "b_w": blob.add_f(b_w or [0.0]),
        "b_b": blob.add_f(Bc.bias.numpy()[walk]), "c_st": blob.add_i(c_st), "c_ix": blob.add_i(c_ix or [0]),
        "c_w": blob.add_f(c_w or [0.0]), "c_b": blob.add_f(C.bias.numpy()), "mask": blob.add_mask(masks),
    }
    bp.flops = 2 * ho * wo * int((wa != 0).sum() + (wb != 0).sum() + (wc != 0).sum())
    return bp


def phase_weights(w: torch.Tensor, s: int) -> torch.Tensor:
    """A k x k stride-s kernel as the ceil(k / s)-tap stride-1 kernel over a PhaseOp's output:
    W'[o, (c*s + py)*s + px, a, b] = W[o, c, s*a + py, s*b + px], 0 past the kernel (any dtype: the int8 engine
    lowers its integer weights the same way)."""
    o, ig, k, _ = w.shape
    kp = -(-k // s)
    wpad = torch.zeros(o, ig, kp * s, kp * s, dtype=w.dtype)
    wpad[:, :, :k, :k] = w
    return wpad.reshape(o, ig, kp, s, kp, s).permute(0, 1, 3, 5, 2, 4).reshape(o, ig * s * s, kp, kp)


def concat_aliases(graph: Graph) -> dict[int, tuple[int, int]]:
    """value -> (buffer, its first channel there) for the inputs of every channel concatenation that can be
    written in place, the buffer being the outermost concatenation holding it. A concatenation qualifies when its
    output is a 3-D map that is neither a graph input nor output, read only by native ops, and each input is a
    distinct map of its size made by a native op other than a phase split (whose layout is its conv's), read
    only by native ops and placed in no other concatenation (a value has one place). The graph's input never
    qualifies: the caller's tensor is copied into its own buffer.

    Concatenations are taken last first, so one that is an input of a later one nests inside it (its inputs
    land in the outer buffer), and one whose inputs already sit in order in a later one's buffer is a view of it:
    DenseNet's layers each concatenate every feature before them, a prefix of the block's final concatenation,
    which copied quadratically many planes. ``make_plan`` gives every such value the buffer's image stride.
    Measured: GhostNet (32 concatenations) 8x pattern at 224, b1, 2 threads, Zen 4: 2.90 ms copying each plane
    whole, 1.84 ms in place (5.06 ms copying element by element, as before)."""
    producer = {op.output: op for op in graph.ops}
    ends = set(graph.inputs) | set(graph.outputs)
    readers: dict[int, list] = {}
    for op in graph.ops:
        for v in graph.reads(op):
            readers.setdefault(v, []).append(op)

    def own_map(v: int, hw: tuple) -> bool:
        p = producer.get(v)
        return (p is not None and p.native and not isinstance(p, PhaseOp) and v not in ends
                and len(graph.values[v].shape) == 3 and tuple(graph.values[v].shape[1:]) == hw
                and all(r.native for r in readers.get(v, [])))

    place: dict[int, tuple[int, int]] = {}          # value -> (the concatenation it is in, first channel)
    for op in reversed(graph.ops):
        if not (isinstance(op, ConcatOp) and op.native):
            continue
        z = op.output
        zs = tuple(graph.values[z].shape)
        if (len(zs) != 3 or z in ends or len(set(op.inputs)) != len(op.inputs)
                or not all(r.native for r in readers.get(z, [])) or not all(own_map(v, zs[1:]) for v in op.inputs)):
            continue
        offs = np.cumsum([0] + [graph.values[v].shape[0] for v in op.inputs])[:-1].tolist()
        if all(v in place for v in op.inputs):
            w, s0 = place[op.inputs[0]]
            if z not in place and all(place[v] == (w, s0 + o) for v, o in zip(op.inputs, offs)):
                place[z] = (w, s0)          # a view: its inputs lie in order in one later concatenation
            continue
        if any(v in place for v in op.inputs):
            continue
        for v, o in zip(op.inputs, offs):
            place[v] = (z, o)
    out: dict[int, tuple[int, int]] = {}
    for v, (z, o) in place.items():
        while z in place:                   # nested: the offset in the outermost buffer
            z, o2 = place[z]
            o += o2
        out[v] = (z, o)
    return out


def _stack_projections(graph: Graph) -> Graph:
    """``relu(D(x) + C(y))`` with C and D 1x1 stride-1 convs, C's output read by D's residual epilogue alone,
    becomes ``relu(F(concat(y, x)))``: F = [C | D] over the stacked input, bias C's + D's, the concat written in
    place. The unfused pair wrote C's output (ResNet-50 layer1: 3.2 MB) and read it back in D's epilogue.
    Applied only where the concatenation will be in place (``concat_aliases``); a copying one would cost more.
    ResNet-50 8x pattern at 224, b1, 2 threads, Zen 4, network-order profile: its four projection blocks
    3.06 -> 2.51 ms with their subsamples (network 15.4 -> 14.9 ms) in a noisy period; in two quieter ones the
    network moved -0.30 and +0.06 ms (12.2-12.5 ms), inside their noise."""
    values = dict(graph.values)
    ops = list(graph.ops)
    nid = max(values) + 1 if values else 0
    producer = {op.output: k for k, op in enumerate(ops)}
    outs = set(graph.outputs)

    def plain_1x1(op) -> bool:
        return (isinstance(op, ConvOp) and op.native and op.weight.shape[2:] == (1, 1) and op.stride == 1
                and op.padding == 0 and op.groups == 1 and op.tap_period == 1)

    k = 0
    while k < len(ops):
        d = ops[k]
        r = d.residual if isinstance(d, ConvOp) else None
        kc = producer.get(r) if r is not None else None
        c = ops[kc] if kc is not None else None
        if not (plain_1x1(d) and d.res_kind == "identity" and r not in d.inputs and plain_1x1(c)
                and c.act == "none" and c.residual is None and r not in outs
                and [j for j, o in enumerate(ops) if r in Graph.reads(o)] == [k] and c.inputs[0] != d.inputs[0]):
            k += 1
            continue
        y, x = c.inputs[0], d.inputs[0]
        values[nid] = Value(nid, (values[y].shape[0] + values[x].shape[0],) + tuple(values[x].shape[1:]),
                            f"{c.name}+{d.name}.stack")
        cat = ConcatOp(f"{c.name}+{d.name}.stack", [y, x], nid)
        fused = dataclasses.replace(
            d, name=f"{c.name}+{d.name}", inputs=[nid], residual=None,
            weight=torch.cat([c.weight, d.weight], 1).contiguous(), bias=c.bias + d.bias,
            folded=list(dict.fromkeys(list(c.folded) + list(d.folded) + [f"stacked {c.name}"])))
        trial = ops[:kc] + ops[kc + 1:k] + [cat, fused] + ops[k + 1:]
        g = Graph(values, trial, list(graph.inputs), list(graph.outputs))
        if y not in concat_aliases(g):
            del values[nid]
            k += 1
            continue
        ops = trial
        producer = {op.output: j for j, op in enumerate(ops)}
        nid += 1
        k += 1          # the fused conv now sits at k (C's removal moved it one back; the concat is at k - 1)
    return Graph(values, ops, list(graph.inputs), list(graph.outputs))


def lower(graph: Graph, opts: PlanOptions = DEFAULT_OPTIONS, vec: int = VEC, wide: bool = False) -> Graph:
    """Rewrites that let the planner's fast paths apply; the input graph is left as it was.

    A 1x1 stride-2 conv (ResNet's projection shortcuts) becomes a subsample (a 1x1 stride-2 max pool: a strided
    copy, NaN kept) and a stride-1 1x1 conv: the strided conv otherwise assembles every input vector from two
    loads and a shuffle, or 8 scalar loads, once per filter (blocked mode) or per filter and channel (direct).
    Measured on dense ResNet-50 at 224 (blocked mode): 72.3 -> 70.2 ms; pattern 8x 30.9 -> 30.5 ms.

    A conv with padding wider than the layout's one-pixel border, or a kernel larger than 3x3 with stride 2
    (ResNet's 7x7 stem), becomes a PhaseOp (space-to-depth with the padding as real zeros) and a stride-1
    unpadded conv of ceil(k / s) taps a side over it, whose kernels the planner runs like any other (stride 1: a
    zero-padded copy and a conv with padding 1, read from the layout's border). So does a
    sparse 3x3 stride-2 conv (PlanOptions.phase_s2_max_density): the 2x2 stride-1 conv runs flat-tiled, each
    input vector one load, where the strided conv assembles it from two loads and a shuffle.

    Last, a bottleneck's conv3 and its 1x1 projection shortcut become one conv over both inputs stacked
    (``_stack_projections``, PlanOptions.fuse_projection).
    """
    values = dict(graph.values)
    ops: list = []
    nid = max(values) + 1 if values else 0
    for op in graph.ops:
        if (isinstance(op, ConvOp) and op.weight.shape[2:] == (1, 1) and op.stride > 1 and op.padding == 0
                and op.groups == 1 and len(values[op.inputs[0]].shape) == 3):
            c = values[op.inputs[0]].shape[0]
            _, ho, wo = values[op.output].shape
            values[nid] = Value(nid, (c, ho, wo), f"{op.name}.subsample")
            ops.append(PoolOp(f"{op.name}.subsample", [op.inputs[0]], nid, mode="max", kernel=1,
                              stride=op.stride, padding=0))
            ops.append(dataclasses.replace(op, inputs=[nid], stride=1))
            nid += 1
            continue
        s2 = (isinstance(op, ConvOp) and op.stride == 2 and op.groups == 1 and op.weight.shape[2:] == (3, 3)
              and op.padding == 1 and len(values[op.inputs[0]].shape) == 3
              and values[op.output].shape[1] * values[op.output].shape[2] > opts.gather_max
              and 4 * math.prod(values[op.inputs[0]].shape) >= opts.flat_tiled_min_bytes
              and ((_narrow(vec, wide) and op.weight.shape[1] <= opts.phase_s2_stem_cin_narrow)
                   or torch.count_nonzero(op.weight).item() <= opts.phase_s2_max_density * op.weight.numel())
              and not (_ochan32(opts, vec, wide) and _blocks_share_kernels(op.weight, opts)))
        dwrow = (isinstance(op, ConvOp) and len(values[op.inputs[0]].shape) == 3
                 and dw_rows_ok(op, values[op.inputs[0]].shape[0], values[op.output].shape[2], opts, vec, wide))
        if isinstance(op, ConvOp) and not dwrow and (s2 or op.padding > 1 or (op.stride > 1 and op.weight.shape[2] > 3)):
            s, pd = op.stride, op.padding
            w = op.weight
            o, ig, k, _ = w.shape
            kp = -(-k // s)
            _, ho, wo = values[op.output].shape
            c = values[op.inputs[0]].shape[0]
            if op.groups == 1 or s > 1:
                # depthwise (ig = 1): filter o reads the s*s phase channels of its own channel, a grouped conv
                w2 = phase_weights(w, s)
            else:                       # depthwise, stride 1: a zero-padded copy, same channels
                w2 = w
            # a sparse stride-1 conv (a kernel-list mode): the split pads all but one pixel and the conv reads that
            # one from the layout's zero border, so the split's rows are 2 floats narrower and fit the conv output's
            # row stride more often (flat modes need equal row strides: a 28-wide map's 32 floats hold 30 columns
            # and a border, not 32). Blocked and direct modes measured 1-3% slower with the padding (dense 5x5,
            # depthwise 5x5 / 7x7 at 14-56 wide), so the others keep the whole padding in the split
            sparse = (torch.count_nonzero(w).item()
                      < opts.ochan_min_density * w.shape[0] * w.shape[1] * len(op.taps()))
            cpad = 1 if s == 1 and op.groups == 1 and sparse else 0
            values[nid] = Value(nid, (c * s * s, ho + kp - 1 - 2 * cpad, wo + kp - 1 - 2 * cpad), f"{op.name}.phase")
            ops.append(PhaseOp(f"{op.name}.phase", [op.inputs[0]], nid, stride=s, padding=pd - cpad))
            # (an embedded kernel keeps its taps through a stride-1 split; a stride-2 one's phase kernels run
            # only taps some weight of the phase has, as a strided stem's do)
            ops.append(dataclasses.replace(op, inputs=[nid], weight=w2.contiguous(), stride=1, padding=cpad,
                                           tap_period=s * s, embed=op.embed if s == 1 else None))
            nid += 1
            continue
        ops.append(op)
    lowered = Graph(values, ops, list(graph.inputs), list(graph.outputs))
    return _stack_projections(lowered) if opts.fuse_projection and opts.concat_in_place else lowered


@dataclasses.dataclass
class BandPlan:
    """A 1x1 expand conv and the 3x3 depthwise conv (stride 1 or 2, padding 1) that alone reads it, run as one op
    on maps too large for ``BlockPlan``: per (image, band of ``rows`` output rows) and expanded channel, the
    expanded rows the band's taps reach are computed into a one-channel scratch strip (L1) and filtered from
    there, so the expanded map - the largest value of an inverted-residual network (MobileNetV2 at 224: 96 x
    112 x 112, 4.8 MB) - is never written to memory and read back. Rows the band shares with the next band are
    computed twice (one row for stride 2, two for stride 1 per band). Bands of all images are dealt to the
    threads in contiguous runs; every output value is computed the same way whatever the split."""

    a: int                                # op indices: expand, depthwise
    b: int
    cin: int
    mid: int
    h: int                                # expanded map (the depthwise input)
    w: int
    ho: int
    wo: int
    s: int
    rows: int                             # output rows per band
    nb: int                               # bands per image
    nf: int                               # chunks of expanded channels per band (small maps: no recomputed rows)
    R: int                                # expanded rows a band reads: (rows - 1) * s + 3
    V: int                                # vectors per output row
    G: int                                # lanes (16 on AVX-512 hosts, else the plan's width)
    TV: int                               # vectors per tile of the expand step
    F: int = 1                            # expanded channels per expand step: 1 = kernel lists (sparse), else
                                          # dense weights [block][cin][F], each input vector loaded once for F
    offs: dict = dataclasses.field(default_factory=dict)
    flops: int = 0

    @property
    def strip(self) -> int:
        """Floats of one strip: R expanded rows, two rows and a tile of slack (vector lanes past the strip's last
        row are computed, then discarded)."""
        return (self.R + 2) * self.rs + (self.TV + 4) * self.G

    def private(self) -> int:
        return self.F * self.strip

    rs: int = 0


def fusable_bands(graph: Graph, taken: set[int], min_pixels: int) -> list[tuple[int, int]]:
    """(expand, depthwise) pairs for ``BandPlan``: a native 1x1 stride-1 conv without residual whose output only a
    native depthwise 3x3 conv (stride 1 or 2, padding 1, no residual) reads, on maps of more than ``min_pixels``,
    neither value a graph output, no op already fused. Which dense expand convs fuse is make_plan's choice
    (``band_dense_min_bytes``)."""
    out = []
    outs = set(graph.outputs)
    for k in range(len(graph.ops) - 1):
        a, b = graph.ops[k], graph.ops[k + 1]
        if k in taken or k + 1 in taken or not (isinstance(a, ConvOp) and isinstance(b, ConvOp)):
            continue
        if not (a.native and b.native and a.weight.shape[2:] == (1, 1) and a.groups == 1 and a.stride == 1
                and a.padding == 0 and a.residual is None and a.tap_period == 1
                and len(graph.values[a.inputs[0]].shape) == 3):
            continue
        mid = a.weight.shape[0]
        if not (b.inputs[0] == a.output and b.weight.shape == (mid, 1, 3, 3) and b.groups == mid
                and b.stride in (1, 2) and b.padding == 1 and b.residual is None and b.tap_period == 1
                and b.embed is None and a.output not in outs and len(graph.users(a.output)) == 1):
            continue
        _, ho, wo = graph.values[b.output].shape
        if ho * wo <= min_pixels:
            continue
        out.append((k, k + 1))       # (a 1x1 conv is never also the depthwise half of the pair before)
    return out


def plan_band(graph: Graph, pair: tuple[int, int], blob: Blob, threads: int, lin: Layout, vec: int, wide: bool,
              opts: PlanOptions, dense_from: float = 1.01) -> BandPlan:
    ka, kb = pair
    A, Bc = graph.ops[ka], graph.ops[kb]
    wa = A.weight.detach().float().reshape(A.weight.shape[0], -1)          # (mid, cin)
    wb = Bc.weight.detach().float().reshape(Bc.weight.shape[0], 9)         # (mid, 9)
    mid, cin = wa.shape
    _, h, w = graph.values[A.output].shape
    _, ho, wo = graph.values[Bc.output].shape
    s = Bc.stride
    # bands of at most band_rows rows (balanced: the last band is not a sliver); a band recomputes (3 - s) strip
    # rows, so short bands cost more: batch 1 gets its two items per thread from chunks of expanded channels
    nb = -(-ho // opts.band_rows)
    rows = -(-ho // nb)
    nb = -(-ho // rows)
    # an expand conv at least dense_from dense steps F channels at a time over dense weights
    F = max(1, opts.band_f) if float((wa != 0).float().mean()) >= dense_from else 1
    nblk = -(-mid // F)
    nf = max(1, min(nblk, -(-2 * threads // nb)))
    R = (rows - 1) * s + 3
    G = 16 if wide else vec
    V = -(-wo // G)
    TV = (12 if G == 16 else 8) if F == 1 else max(1, (24 if G == 16 or wide else 12) // F)
    bp = BandPlan(ka, kb, cin, mid, h, w, ho, wo, s, rows, nb, nf, R, V, G, TV, F, rs=lin.rs)
    a_st, a_ch, a_w, b_st, b_tap, b_w = _expand_depthwise_lists(wa, wb, range(mid))
    # 0/1 lanes of the strip: a position is an image pixel when its column is 1..w (the strip has the input's
    # row stride and border columns, which must stay 0: they are the depthwise conv's padding)
    span = (R + 2) * lin.rs + (TV + 4) * G
    cols = np.arange(span) % lin.rs
    bp.offs = {"a_st": blob.add_i(a_st), "a_ch": blob.add_i(a_ch or [0]), "a_w": blob.add_f(a_w or [0.0]),
               "a_b": blob.add_f(A.bias.numpy()), "b_st": blob.add_i(b_st), "b_tap": blob.add_i(b_tap or [0]),
               "b_w": blob.add_f(b_w or [0.0]), "b_b": blob.add_f(Bc.bias.numpy()),
               "mask": blob.add_mask((cols >= 1) & (cols <= w))}
    if F > 1:
        wd = np.zeros((nblk * F, cin), np.float32)
        wd[:mid] = wa.numpy()
        bp.offs["a_wd"] = blob.add_f(wd.reshape(nblk, F, cin).transpose(0, 2, 1))     # [block][cin][F]
        ab = np.zeros(nblk * F, np.float32)
        ab[:mid] = A.bias.numpy()
        bp.offs["a_bd"] = blob.add_f(ab)
    bp.flops = 2 * (h * w * int((wa != 0).sum()) + ho * wo * int((wb != 0).sum()))
    return bp


def make_plan(graph: Graph, threads: int, vec: int = VEC, conv_mode: str = "auto", wide: bool = False,
              opts: PlanOptions = DEFAULT_OPTIONS) -> Plan:
    """``wide``: direct-mode layers on maps a multiple of 16 wide may use 16-lane vectors (AVX-512 hosts)."""
    blob = Blob()
    # a pooled (C,1,1) vector stays plain unless a conv reads it as a map (squeeze-excite's 1x1 convs)
    conv_in = {v for op in graph.ops if isinstance(op, ConvOp) for v in op.inputs}
    gap_out = {op.output for op in graph.ops if isinstance(op, GapOp) and op.output not in conv_in}
    # 16-lane flat tiles in 8-lane plans (AVX-512 hosts): rows a whole number of 16-lane vectors, so taps a row
    # apart read the same vectors (see codegen._accumulate_shared)
    ra = 16 if wide and vec == 8 and opts.align_rows_wide else vec
    layouts = {vid: layout_for(v.shape, flat=vid in gap_out, vec=vec, align_rows=opts.align_rows, row_align=ra)
               for vid, v in graph.values.items()}
    # a phase split read only by its unpadded conv takes that conv's row stride where its rows fit (no right
    # border column: an unpadded conv never reads one), so the conv can run along the flattened plane (flat modes
    # need equal row strides); only values of one plane geometry ever share a buffer, so this is safe to mix
    readers: dict[int, list] = {}       # every op that reads a value, a residual fused into its epilogue included
    for op in graph.ops:
        for v in graph.reads(op):
            readers.setdefault(v, []).append(op)
    for op in graph.ops:
        if isinstance(op, PhaseOp) and op.output not in graph.outputs and len(readers.get(op.output, [])) == 1:
            cv = readers[op.output][0]
            lo_, lp = layouts[cv.output], layouts[op.output]
            # (a conv with padding 1 reads the right border column too)
            if (isinstance(cv, ConvOp) and cv.stride == 1 and cv.padding <= 1 and lo_.is_map and lp.is_map
                    and lp.rs != lo_.rs and lp.shape[2] + 1 + cv.padding <= lo_.rs):
                c_, h_, _ = lp.shape
                layouts[op.output] = Layout(lp.shape, True, lo_.rs, (h_ + 2) * lo_.rs, c_ * (h_ + 2) * lo_.rs)
    # concatenations in place: an input's planes are its slice of the concatenation's (same plane geometry),
    # one image apart by the concatenation's image stride; the concat op itself runs nothing
    aliases: dict[int, tuple[int, int]] = {}
    absorbed: dict[int, int] = {}
    if opts.concat_in_place:
        placed = concat_aliases(graph)
        family: dict[int, list[int]] = {}
        for v, (z, _) in placed.items():
            family.setdefault(z, []).append(v)
        # a buffer's values must share its plane geometry (a pooled vector read by no conv is laid out flat)
        fits = {z for z, vs in family.items()
                if layouts[z].is_map and all(layouts[v].is_map and (layouts[v].rs, layouts[v].plane)
                                             == (layouts[z].rs, layouts[z].plane) for v in vs)}
        aliases = {v: zo for v, zo in placed.items() if zo[0] in fits}
        for v, (z, _) in aliases.items():
            layouts[v] = dataclasses.replace(layouts[v], image=layouts[z].image)
        for k, op in enumerate(graph.ops):
            z = op.output
            root = aliases.get(z, (z, 0))[0]
            if not (isinstance(op, ConcatOp) and op.inputs and all(aliases.get(v, (-1,))[0] == root
                                                                     for v in op.inputs)):
                continue
            # runs nothing: its inputs were written into place; charged to (and kept live by) its first reader
            absorbed[k] = next((j for j in range(k + 1, len(graph.ops)) if z in graph.reads(graph.ops[j])), k)
    convs: dict[int, ConvPlan] = {}
    other: dict[int, dict] = {}
    writer: dict[int, list[int]] = {}       # value id -> thread that writes each channel (batch 1)
    by_rows: set[int] = set()               # values written split by rows (batch 1)
    blocks: dict[int, BlockPlan] = {}
    if opts.fuse_blocks:
        dense = opts.ochan_min_density if _ochan(opts, vec, wide) else opts.blocked_min_density
        for trip in fusable_blocks(graph, opts.packed1_max, dense):
            blocks[trip[0]] = plan_block(graph, trip, blob, threads, _narrow(vec, wide) and opts.packed_narrow)
            absorbed[trip[1]] = absorbed[trip[2]] = trip[0]
    bands: dict[int, BandPlan] = {}
    if opts.fuse_bands:
        dense = opts.ochan_min_density if _ochan(opts, vec, wide) else opts.blocked_min_density
        for pair in fusable_bands(graph, set(blocks) | set(absorbed), opts.band_min_pixels):
            A, Bc = graph.ops[pair[0]], graph.ops[pair[1]]
            li_, lm_, lo_ = layouts[A.inputs[0]], layouts[A.output], layouts[Bc.output]
            if not (li_.is_map and lm_.is_map and lo_.is_map and li_.rs == lm_.rs):
                continue
            if (np.count_nonzero(A.weight.detach().numpy()) >= dense * A.weight.numel()
                    and 4 * lm_.image < opts.band_dense_min_bytes):
                continue
            bands[pair[0]] = plan_band(graph, pair, blob, threads, li_, vec, wide, opts, dense)
            absorbed[pair[1]] = pair[0]
    producer = {op.output: k for k, op in enumerate(graph.ops)}
    for k, op in enumerate(graph.ops):
        if k in blocks or k in bands or k in absorbed:
            continue
        if isinstance(op, ConvOp):
            c = convs[k] = plan_conv(op, graph.values[op.inputs[0]].shape, graph.values[op.output].shape, blob,
                                     threads, layouts[op.inputs[0]], layouts[op.output], vec, conv_mode, wide,
                                     affinity=writer.get(op.inputs[0]), rows_in=op.inputs[0] in by_rows,
                                     opts=opts)
            m = _se_scale(graph, k, c, producer, readers, layouts) if opts.fuse_se_scale else None
            if m is not None:
                c.in_value, c.in_scale = graph.ops[m].inputs
                absorbed[m] = k
            if not c.spatial and not c.gather:
                writer[op.output] = c.thread_of
            if c.spatial:
                by_rows.add(op.output)
        elif isinstance(op, LinearOp):
            w = op.weight.numpy()
            nz = w != 0
            if nz.mean() <= opts.sparse_linear_density:
                # pruned linears are memory-bound: CSR streams only the kept weights (+ a 2- or 4-byte index each)
                rows, cols = np.nonzero(nz)
                # up to 65536 inputs (VGG's 25088): 2-byte column indices, packed two per int of the blob
                short = w.shape[1] <= 65536
                col_off = (blob.add_u16 if short else blob.add_i)(cols if len(cols) else [0])
                other[k] = {"csr": True, "rowptr_off": blob.add_i(np.concatenate([[0], np.cumsum(nz.sum(1))])),
                            "col_off": col_off, "col16": short,
                            "val_off": blob.add_f(w[rows, cols] if len(cols) else [0.0]),
                            "b_off": blob.add_f(op.bias.numpy()), "nnz": int(len(cols))}
            else:
                other[k] = {"w_off": blob.add_f(w), "b_off": blob.add_f(op.bias.numpy())}
        elif isinstance(op, EltwiseOp) and op.fn == "affine":
            other[k] = {"scale_off": blob.add_f(op.scale.numpy()), "shift_off": blob.add_f(op.shift.numpy())}
        elif isinstance(op, ResizeOp):
            other[k] = {"ys_off": blob.add_i(np.asarray(op.ys, np.int32)), "yw_off": blob.add_f(op.yw or [0.0]),
                        "xs_off": blob.add_i(np.asarray(op.xs, np.int32)), "xw_off": blob.add_f(op.xw or [0.0])}
        elif isinstance(op, GatherOp):
            other[k] = {"index_off": blob.add_i(np.asarray(op.index, np.int32))}
        if isinstance(op, (EltwiseOp, GapOp, PoolOp, ResizeOp, GatherOp)) and opts.chan_affinity:
            # channel c on the thread that wrote it (batch 1 / leftover images): squeeze-excite's multiply and
            # global pool read maps the conv before wrote split by filters; interleaved channels sent half the
            # map across cores. Whole rounds of images stay one image per thread, as in the convs. A gather's
            # output plane goes to the thread that wrote the plane it copies.
            thr = writer.get(op.inputs[0])
            c_in = graph.values[op.inputs[0]].shape[0]
            if thr is not None and len(thr) == c_in:
                thr = [thr[i] for i in op.index] if isinstance(op, GatherOp) else thr
                other.setdefault(k, {})["thread_of_off"] = blob.add_i(np.asarray(thr, np.int32))
                if graph.values[op.output].shape[0] == len(thr):
                    writer[op.output] = list(thr)
    segments: list[tuple[str, list[int]]] = []
    for k, op in enumerate(graph.ops):
        kind = "native" if op.native else "torch"
        if kind == "native" and segments and segments[-1][0] == "native":
            segments[-1][1].append(k)
        else:
            segments.append((kind, [k]))
    plan = Plan(graph, layouts, convs, other, blob, threads, segments, vec, blocks=blocks, bands=bands,
                absorbed=absorbed, options=opts, narrow=_narrow(vec, wide), aliases=aliases)
    plan.scratch_id = max(graph.values) + 1
    plan.scratch = max([plan.gather_size(k) for k, c in convs.items() if c.gather or c.packed1]
                       + [plan.partials_size(k) for k, c in convs.items() if c.flat_cb or c.flat_pack]
                       + [bp.scratch(threads) for bp in blocks.values()]
                       + [threads * bp.private() for bp in bands.values()], default=0)
    return plan

"""Dependency groups: which channels of which layers must be removed together.

Every channel of every traced tensor is a node of a union-find. Ops that carry a channel through unchanged
(BatchNorm, activations, pooling, depthwise convs, residual adds, the option-A zero-pad shortcut, concat,
flatten) join the channels they tie; convs and linears with ``groups == 1`` are the boundaries where
channels are *created* (output filters) and *consumed* (input slices). A component -- one removable
channel -- is pruned as a unit: every filter producing it, every BN channel and every consuming input slice.

Components touching the network input or output, or any op we do not understand, are blocked; ``explain()``
says which layers could not be grouped and why, before anything is changed.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import defaultdict

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import SparseforgeError
from ..models.cifar_resnet import PadShortcut

# channel-wise ops: output channel c depends only on input channel c
_UNARY_FN = {F.relu, F.relu6, F.hardtanh, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
             F.adaptive_max_pool2d, torch.relu, torch.sigmoid, torch.tanh, F.gelu, F.silu, F.hardswish,
             F.leaky_relu, torch.clamp}
_UNARY_METHOD = {"relu", "relu_", "clamp", "clamp_", "contiguous", "clone", "sigmoid", "tanh", "detach"}
_UNARY_MODULE = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.Hardswish,
                 nn.LeakyReLU)
_BINARY = {operator.add, operator.iadd, operator.sub, operator.mul, torch.add, torch.sub, torch.mul}
_BINARY_METHOD = {"add", "add_", "sub", "mul", "mul_"}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, PadShortcut) or super().is_leaf_module(m, qualname)


@dataclasses.dataclass
class Slot:
    """One place a channel lives: ``role`` is out (filter / output row), in (input slice), bn, dw (depthwise)."""

    module: str
    role: str
    index: int


@dataclasses.dataclass
class Group:
    """Channels that share the same set of layers (e.g. a ResNet stage's residual stream, one conv's filters)."""

    name: str                            # the first producing layer
    modules: list[str]                   # every layer the group's channels live in
    channels: list[list[Slot]]           # one entry per removable channel (component)
    kinds: set[str]                      # residual | concat | depthwise | plain
    blocked: str = ""                    # why it cannot be pruned ("" = prunable)
    roots: list[int] = dataclasses.field(default_factory=list)   # union-find id of each channel

    def __len__(self) -> int:
        return len(self.channels)

    def producers(self, c: int) -> list[Slot]:
        return [s for s in self.channels[c] if s.role == "out"]


class DependencyGraph:
    def __init__(self, model: nn.Module, example_input: torch.Tensor):
        self.model = model
        self.modules = dict(model.named_modules())
        try:
            graph = _Tracer().trace(model)
        except Exception as e:  # noqa: BLE001 - fx raises many kinds on dynamic control flow
            raise SparseforgeError(f"cannot trace {type(model).__name__} with torch.fx ({e}); structured pruning needs "
                                   "a traceable model (no data-dependent control flow in forward)") from None
        self.gm = fx.GraphModule(model, graph)
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                ShapeProp(self.gm).propagate(example_input)
        finally:
            model.train(was)
        self.problems: list[str] = []
        self._build()

    # ---- union-find over (node, channel) --------------------------------------------------------
    def _find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self.parent[rb] = ra

    def _ch(self, node: fx.Node) -> int:
        tm = node.meta.get("tensor_meta")
        if tm is None or not hasattr(tm, "shape") or len(tm.shape) < 2:
            return 0
        return int(tm.shape[1])

    def _build(self) -> None:
        nodes = list(self.gm.graph.nodes)
        self.offset: dict[fx.Node, int] = {}
        total = 0
        for n in nodes:
            self.offset[n] = total
            total += self._ch(n)
        self.parent = list(range(total))
        self.slots: dict[int, list[Slot]] = defaultdict(list)     # node-channel id -> slots
        self.block: dict[int, str] = {}
        self.tags: dict[int, set[str]] = defaultdict(set)
        self.node_of: dict[str, fx.Node] = {}                      # module name -> its call node

        def ids(n: fx.Node) -> range:
            return range(self.offset[n], self.offset[n] + self._ch(n))

        def tie(a: fx.Node, b: fx.Node, tag: str = "") -> None:
            for i, j in zip(ids(a), ids(b)):
                self._union(i, j)
                if tag:
                    self.tags[i].add(tag)

        def block_all(n: fx.Node, why: str) -> None:
            for i in ids(n):
                self.block.setdefault(i, why)

        for n in nodes:
            if n.op == "placeholder":
                block_all(n, "network input")
            elif n.op == "output":
                for a in n.all_input_nodes:
                    block_all(a, "network output")
            elif n.op == "get_attr":
                block_all(n, "parameter used as a tensor")
            elif n.op == "call_module":
                self._module(n, ids, tie, block_all)
            elif n.op in ("call_function", "call_method"):
                self._function(n, ids, tie, block_all)

    def _module(self, n, ids, tie, block_all) -> None:
        m = self.modules[n.target]
        name = str(n.target)
        self.node_of[name] = n
        src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if isinstance(m, nn.Conv2d):
            if m.groups == 1:
                for c, i in enumerate(ids(n)):
                    self.slots[i].append(Slot(name, "out", c))
                for c, i in enumerate(ids(src)):
                    self.slots[i].append(Slot(name, "in", c))
            elif m.groups == m.in_channels == m.out_channels:
                tie(src, n, "depthwise")
                for c, i in enumerate(ids(n)):
                    self.slots[i].append(Slot(name, "dw", c))
            else:
                self.problems.append(f"{name}: grouped conv (groups={m.groups}) is not depthwise; its channels are kept")
                block_all(n, f"grouped conv {name}")
                block_all(src, f"grouped conv {name}")
        elif isinstance(m, nn.Linear):
            for c, i in enumerate(ids(n)):
                self.slots[i].append(Slot(name, "out", c))
            for c, i in enumerate(ids(src)):
                self.slots[i].append(Slot(name, "in", c))
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            tie(src, n)
            for c, i in enumerate(ids(n)):
                self.slots[i].append(Slot(name, "bn", c))
        elif isinstance(m, PadShortcut):
            for c, (i, j) in enumerate(zip(ids(src), list(ids(n))[m.pad_before:])):
                self._union(i, j)
                self.tags[i].add("residual")
            self.shortcuts = getattr(self, "shortcuts", {})
            self.shortcuts[name] = n
        elif isinstance(m, _UNARY_MODULE):
            tie(src, n)
        elif isinstance(m, nn.Flatten):
            self._flatten(src, n, ids)
        else:
            self.problems.append(f"{name}: {type(m).__name__} is not understood; the channels around it are kept")
            block_all(n, f"unknown layer {name}")
            for a in n.all_input_nodes:
                block_all(a, f"unknown layer {name}")

    def _flatten(self, src, n, ids) -> None:
        cs, cn = self._ch(src), self._ch(n)
        if cs == 0 or cn % cs:
            return
        per = cn // cs
        out = list(ids(n))
        for c, i in enumerate(ids(src)):
            for j in range(per):
                self._union(i, out[c * per + j])

    def _function(self, n, ids, tie, block_all) -> None:
        t = n.target
        tensors = [a for a in n.args if isinstance(a, fx.Node) and self._ch(a)]
        if self._ch(n) == 0:
            # ints / shapes / scalars: only a problem when a tensor with channels goes in and none comes out
            if t in ("size", "dim") or t is getattr:
                return
            for a in tensors:
                block_all(a, f"{n.name}: consumed by {getattr(t, '__name__', t)}")
            return
        if t in _UNARY_FN or (n.op == "call_method" and t in _UNARY_METHOD):
            tie(tensors[0], n)
        elif (t in (torch.mean, torch.sum, torch.amax) or (n.op == "call_method" and t in ("mean", "sum", "amax"))) \
                and self._spatial_reduce(n):
            tie(tensors[0], n)
        elif t in _BINARY or (n.op == "call_method" and t in _BINARY_METHOD):
            for a in tensors:
                if self._ch(a) == self._ch(n):
                    tie(a, n, "residual" if len(tensors) > 1 else "")
        elif t is torch.cat and (n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0) in (1, -3)):
            out, k = list(ids(n)), 0
            for a in n.args[0]:
                for i in ids(a):
                    self._union(i, out[k])
                    self.tags[i].add("concat")
                    k += 1
        elif t in (torch.flatten, "flatten", "view", "reshape") and len(tensors) == 1:
            self._flatten(tensors[0], n, ids)
        else:
            name = getattr(t, "__name__", str(t))
            self.problems.append(f"{n.name}: {name} is not understood; the channels around it are kept")
            block_all(n, f"unknown op {name}")
            for a in tensors:
                block_all(a, f"unknown op {name}")

    @staticmethod
    def _spatial_reduce(n: fx.Node) -> bool:
        dims = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        return dims != (None,) and all(isinstance(d, int) and d not in (0, 1, -3, -4) for d in dims)

    # ---- groups ---------------------------------------------------------------------------
    def groups(self, ignored_layers: tuple[str, ...] = ()) -> list[Group]:
        import fnmatch

        comps: dict[int, list[int]] = defaultdict(list)
        for i in range(len(self.parent)):
            comps[self._find(i)].append(i)
        by_sig: dict[tuple, Group] = {}
        for root, members in comps.items():
            slots = [s for i in members for s in self.slots.get(i, [])]
            producers = [s for s in slots if s.role == "out"]
            if not producers:
                continue
            why = next((self.block[i] for i in members if i in self.block), "")
            ign = [s.module for s in producers if any(fnmatch.fnmatch(s.module, g) for g in ignored_layers)]
            if not why and ign:
                why = f"ignored layer {ign[0]}"
            kinds = set().union(*(self.tags.get(i, set()) for i in members)) or {"plain"}
            if len({s.module for s in producers}) > 1:
                kinds.add("residual")
            sig = tuple(sorted({(s.module, s.role) for s in slots}))
            g = by_sig.get(sig)
            if g is None:
                mods = list(dict.fromkeys(s.module for s in sorted(slots, key=lambda s: self._order(s.module))))
                g = Group(name=producers[0].module, modules=mods, channels=[], kinds=kinds, blocked=why)
                by_sig[sig] = g
            g.channels.append(sorted(slots, key=lambda s: (self._order(s.module), s.role)))
            g.roots.append(root)
            if why and not g.blocked:
                g.blocked = why
            g.kinds |= kinds
        out = sorted(by_sig.values(), key=lambda g: self._order(g.name))
        for g in out:
            if len(g.kinds) > 1:
                g.kinds.discard("plain")
            order = sorted(range(len(g.channels)), key=lambda k: next(s.index for s in g.channels[k] if s.role == "out"))
            g.channels = [g.channels[k] for k in order]
            g.roots = [g.roots[k] for k in order]
        return out

    def keep_flags(self, node: fx.Node, removed: set[int]) -> list[bool]:
        """Per channel of ``node``: does it survive removing the components ``removed`` (root ids)?"""
        return [self._find(i) not in removed for i in range(self.offset[node], self.offset[node] + self._ch(node))]

    def roots_of(self, node: fx.Node) -> list[int]:
        return [self._find(i) for i in range(self.offset[node], self.offset[node] + self._ch(node))]

    def _order(self, module: str) -> int:
        names = list(self.modules)
        return names.index(module) if module in self.modules else len(names)

    def explain(self, ignored_layers: tuple[str, ...] = ()) -> str:
        """A pre-flight report: every group, what it couples, and what cannot be pruned and why."""
        gs = self.groups(ignored_layers)
        lines = [f"{len(gs)} dependency groups ({sum(1 for g in gs if not g.blocked)} prunable)"]
        for g in gs:
            state = f"BLOCKED ({g.blocked})" if g.blocked else "prunable"
            mods = ", ".join(g.modules[:6]) + (f", ... (+{len(g.modules) - 6})" if len(g.modules) > 6 else "")
            lines.append(f"  {g.name:28s} {len(g):5d} ch  {'/'.join(sorted(g.kinds)):18s} {state}: {mods}")
        if self.problems:
            lines.append("could not be grouped:")
            lines += [f"  {p}" for p in dict.fromkeys(self.problems)]
        return "\n".join(lines)


def groups(model: nn.Module, example_input: torch.Tensor) -> DependencyGraph:
    """Trace ``model`` and return its dependency graph; ``.groups()`` lists them, ``.explain()`` reports."""
    return DependencyGraph(model, example_input)

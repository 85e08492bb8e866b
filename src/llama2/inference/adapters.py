"""Many LoRA adapters beside one base model, in one batch (the multi-LoRA serving of S-LoRA and Punica).

    bank = AdapterBank(model)                      # a copy of model's module tree; parameters shared, model unchanged
    bank.load("sql", "runs/sql-lora/checkpoints/latest")   # PEFT layout (what a LoRA run saves, or PEFT itself)
    with bank.routed([0, bank.id("sql"), 0]):      # row i of the next forwards uses adapter ids[i] (0: the base)
        logits = bank.model(tokens, ...)

Each projection some adapter targets becomes a `MultiLoRALinear`: the base projection runs once over all rows, then
the adapters add scale * B(A(x)) to their own rows, PEFT's unmerged LoRA forward, so a row computes what the base
with that one adapter computes. A batch of one adapter takes two small matmuls. A mixed batch takes two as well:
x times every adapter's A at once (their A stacked, R = the ranks summed), a mask that keeps each row's own
adapter's columns (times its scale; zeros elsewhere, which add nothing), then times every B at once. Small matmuls
cost more in calls than in arithmetic here, so this beats one pair per adapter while R stays below the projection's
width; past that, each adapter's rows are gathered and multiplied on their own. The engine routes every forward
(decode steps, prefills, tool results) by its requests' `SamplingParams.adapter`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint.adapter import read_adapter_config, read_adapter_weights
from ..checkpoint.hf import CAUSAL_LM
from ..errors import Llama2Error
from ..lora import LoRAConfig

BASE = 0  # the adapter id of the base model itself


@dataclass(frozen=True)
class Route:
    """Which rows of the current forward use which adapter: `uniform` when every row uses the same one, else `ids`
    (each row's adapter id) and `groups`, (adapter id, row indices) for each adapter other than the base."""

    rows: int
    uniform: int | None
    ids: Tensor | None = None
    groups: tuple[tuple[int, Tensor], ...] = ()
    masks: dict = field(default_factory=dict, compare=False)  # a stacking's columns -> (rows, R) scaled mask

    def mask(self, columns: Tensor, scales: Tensor) -> Tensor:
        """(rows, R): scales[j] where column j belongs to the row's adapter (columns[j] is its id), else 0."""
        key = (columns.data_ptr(), scales.data_ptr())
        m = self.masks.get(key)
        if m is None:
            m = self.masks[key] = torch.where(self.ids[:, None] == columns[None, :], scales[None, :],
                                              torch.zeros((), dtype=scales.dtype, device=scales.device))
        return m


class MultiLoRALinear(nn.Module):
    """A projection (any module: nn.Linear, the fp32 kernels' or int8's) plus the low-rank updates of the loaded
    adapters that target it, applied per row as the bank's current route says."""

    STACK_LIMIT = 1.0  # mixed batches multiply by all adapters at once while their ranks sum to at most this x width

    def __init__(self, base: nn.Module, bank: AdapterBank) -> None:
        super().__init__()
        self.base = base
        self._bank = [bank]  # in a list: not a submodule
        self.deltas: dict[int, tuple[Tensor, Tensor, float]] = {}  # adapter id -> (A r x in, B out x r, scale)
        self._stacked: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # A (R x in), B (out x R), ids, scales

    def changed(self) -> None:
        """The deltas changed: stack them again at the next mixed batch."""
        self._stacked = None

    def stacked(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every adapter's A stacked (R x in), B side by side (out x R), and each column's adapter id and scale."""
        if self._stacked is None:
            ids = sorted(self.deltas)
            a = torch.cat([self.deltas[i][0] for i in ids])
            b = torch.cat([self.deltas[i][1] for i in ids], dim=1)
            columns = torch.tensor([i for i in ids for _ in range(self.deltas[i][0].shape[0])], device=a.device)
            scales = torch.tensor([self.deltas[i][2] for i in ids for _ in range(self.deltas[i][0].shape[0])],
                                  dtype=a.dtype, device=a.device)
            self._stacked = (a, b, columns, scales)
        return self._stacked

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        route = self._bank[0].route
        if route is None or not self.deltas:
            return y
        if route.rows != x.shape[0]:
            raise Llama2Error(f"adapter route for {route.rows} rows, but the forward has {x.shape[0]}")
        if route.uniform is not None:
            d = self.deltas.get(route.uniform)
            if d is not None:
                a, b, scale = d
                y = y + F.linear(F.linear(x, a), b) * scale
            return y
        a, b, columns, scales = self.stacked()
        if a.shape[0] <= self.STACK_LIMIT * max(self.base.in_features, self.base.out_features):
            shrunk = F.linear(x, a)
            mask = route.mask(columns, scales)
            return y + F.linear(shrunk * mask.view(mask.shape[0], *[1] * (shrunk.dim() - 2), -1), b)
        for adapter, rows in route.groups:
            d = self.deltas.get(adapter)
            if d is not None:
                a, b, scale = d
                y = y.index_add(0, rows, F.linear(F.linear(x.index_select(0, rows), a), b), alpha=scale)
        return y


class AdapterBank:
    """LoRA adapters by name over a copy of `model` (`self.model`: the same parameters, projections wrapped as
    adapters need them). Adapters are loaded at start-up or between forwards, never during one."""

    def __init__(self, model: nn.Module) -> None:
        memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        self.model = copy.deepcopy(model, memo)
        self.names: dict[str, int] = {}  # name -> adapter id (1, 2, ...)
        self.paths: dict[str, Path] = {}
        self.route: Route | None = None
        self._next = 1
        self._routes: dict[tuple[int, ...], Route] = {}

    def id(self, name: str | None) -> int:
        """The id of an adapter by name (None: the base); an unknown name is an error listing the loaded ones."""
        if name is None:
            return BASE
        try:
            return self.names[name]
        except KeyError:
            have = ", ".join(sorted(self.names)) or "none"
            raise Llama2Error(f"no LoRA adapter named {name!r} is loaded (loaded: {have})") from None

    def load(self, name: str, path: Path | str) -> int:
        """Read the PEFT adapter at `path` and make it available as `name`; returns its id. It must be a causal-LM
        LoRA adapter of this base (every shape is checked before anything changes)."""
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise Llama2Error(f"an adapter name must be a non-empty string without surrounding spaces, got {name!r}")
        if name in self.names:
            raise Llama2Error(f"an adapter named {name!r} is already loaded (from {self.paths[name]})")
        path = Path(path).expanduser()
        config, kind = read_adapter_config(path)
        if kind != CAUSAL_LM:
            raise Llama2Error(f"{path}: a sequence classifier's adapter (task_type SEQ_CLS) cannot generate; serve "
                              "a causal-LM adapter")
        if config.modules_to_save:
            raise Llama2Error(f"{path}: the adapter trains {', '.join(config.modules_to_save)} in full "
                              "(modules_to_save), which cannot be shared with the base; merge it (llama2 lora merge) "
                              "and serve the merged checkpoint")
        deltas = self._deltas(path, config)
        ident = self._next
        self._next += 1
        for module, (a, b) in deltas.items():
            wrapped = self._wrapped(module)
            wrapped.deltas[ident] = (a, b, config.scale)
            wrapped.changed()
        self.names[name] = ident
        self.paths[name] = path
        self._routes.clear()  # their masks were made for the old stacking
        return ident

    def unload(self, name: str) -> None:
        """Forget an adapter (its id is never reused)."""
        ident = self.id(name)
        for m in self.model.modules():
            if isinstance(m, MultiLoRALinear) and m.deltas.pop(ident, None) is not None:
                m.changed()
        del self.names[name], self.paths[name]
        self._routes.clear()

    @contextlib.contextmanager
    def routed(self, adapters: Sequence[int]) -> Iterator[None]:
        """Within: row i of each forward uses adapter adapters[i] (BASE: none)."""
        self.route = self._route(tuple(adapters))
        try:
            yield
        finally:
            self.route = None

    def _route(self, key: tuple[int, ...]) -> Route | None:
        first = key[0]
        if all(a == first for a in key):
            return None if first == BASE else Route(len(key), first)
        route = self._routes.get(key)
        if route is None:
            device = next(self.model.parameters()).device
            groups = tuple((a, torch.tensor([i for i, b in enumerate(key) if b == a], device=device))
                           for a in sorted(set(key) - {BASE}))
            route = Route(len(key), None, torch.tensor(key, device=device), groups)
            if len(self._routes) > 4096:  # decode steps repeat their assignment; keep the cache bounded
                self._routes.clear()
            self._routes[key] = route
        return route

    def _deltas(self, path: Path, config: LoRAConfig) -> dict[str, tuple[Tensor, Tensor]]:
        """The adapter's (A, B) per module name, checked against this model and cast to its dtype."""
        weights = read_adapter_weights(path)
        modules = dict(self.model.named_modules())
        ref = self.model.embed_tokens.weight
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for module in sorted({n.rsplit(".", 2)[0] for n in weights}):
            a, b = weights.pop(f"{module}.lora_A.weight", None), weights.pop(f"{module}.lora_B.weight", None)
            target = modules.get(module)
            if isinstance(target, MultiLoRALinear):
                target = target.base
            if target is None or a is None or b is None:
                raise Llama2Error(f"{path}: tensors for {module!r} do not fit this base model (a module with "
                                  "lora_A and lora_B weights is expected); serve the adapter with its own base")
            out_features, in_features = _shape(target)
            if a.shape != (config.r, in_features) or b.shape != (out_features, config.r):
                raise Llama2Error(f"{path}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, but this "
                                  f"base needs [{config.r}, {in_features}] and [{out_features}, {config.r}]; serve "
                                  f"the adapter with the base it was trained on ({config.base_model!r})")
            out[module] = (a.to(ref.device, ref.dtype), b.to(ref.device, ref.dtype))
        if weights:
            raise Llama2Error(f"{path}: unexpected tensors {sorted(weights)[:3]}; only lora_A and lora_B weights of "
                              "the projections are served")
        if not out:
            raise Llama2Error(f"{path}: the adapter holds no LoRA weights")
        return out

    def _wrapped(self, name: str) -> MultiLoRALinear:
        parent_name, _, attr = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        m = getattr(parent, attr)
        if not isinstance(m, MultiLoRALinear):
            m = MultiLoRALinear(m, self)
            setattr(parent, attr, m)
        return m


def _shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a projection of any kind."""
    try:
        return int(module.out_features), int(module.in_features)
    except AttributeError:
        raise Llama2Error(f"{type(module).__name__} is not a projection an adapter can target") from None

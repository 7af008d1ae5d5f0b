"""SGD for a PruningNet that updates each generator by the crop its step trained: exact, at the crop's cost.

A step trains one gene, so the gradient of a generator's second linear (``weight2``, ``bias2``) is zero
outside that gene's corner ``[:cout, :cin]``. Dense SGD still moves every element (momentum, weight
decay), but with a zero gradient a step maps an element's (weight, momentum) pair by a 2x2 matrix that
depends only on the step's learning rate and its group's momentum, weight decay, dampening and nesterov.
So an element left untouched since step s is brought up to date by the product of the maps of the steps
since: when a gene's corner is about to be generated (``GeneratedConv.generate`` calls ``catch_up``)
and before it takes its gradient step, which is PyTorch's own fused SGD kernel run on the corner. Every
element is brought up to date (``flush``) every ``window`` steps, which keeps the products short and
well conditioned, and whenever the weights or the momentum are read as a whole: the model's and this
optimizer's ``state_dict``. The bookkeeping is the window step at which each (out, in) channel pair was
last brought up to date, per generator matrix.

The gradients never exist at full size: the backward hands each generator a ``CropGrad``
(``models.pruningnet``), the generated weight's gradient ``dw`` and the generator's hidden activation, whose
outer product is the corner's gradient; it is built chunk by chunk inside the step. Under torchrun every
process trains the same gene, so only the ``dw`` are averaged (``all_reduce_crop_gradients``), in one
flat buffer: ``h`` (32 or 64) times fewer values than the corners.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from models.pruningnet import CropGrad, GeneratedConv

# Elements per chunk of a CPU update: a chunk's weights, momentum and gradient stay in the cache while
# the passes of the update run over them.
CPU_CHUNK = 1 << 18


@dataclass
class _Lazy:
    """A generator matrix updated by crop: its group, whether its gradient is ``dw x hidden``
    (``weight2``) or ``dw`` (``bias2``), the window step at which each (out, in) channel pair was last
    brought up to date, and a corner known to be up to date now."""

    param: torch.nn.Parameter
    group: int
    factored: bool
    last: torch.Tensor
    fresh: tuple[int, int] = (0, 0)


def step_map(group: dict) -> list[float]:
    """The 2x2 matrix (row-major) by which one SGD step of ``group`` maps an element's (weight,
    momentum) column when its gradient is zero. PyTorch's step: g = grad + wd w;
    m = mu m + (1 - damp) g; w -= lr (g + mu m if nesterov else m); without momentum w -= lr g."""
    lr, wd, mu, damp = group["lr"], group["weight_decay"], group["momentum"], group["dampening"]
    if mu == 0:
        return [1 - lr * wd, 0.0, 0.0, 0.0]
    keep = 1 - damp
    if group["nesterov"]:
        return [1 - lr * wd - lr * mu * keep * wd, -lr * mu * mu, keep * wd, mu]
    return [1 - lr * keep * wd, -lr * mu, keep * wd, mu]


class CropSGD(torch.optim.SGD):
    """``torch.optim.SGD`` whose generators' ``weight2``/``bias2`` are updated by crop (see the module).

    Every other parameter takes PyTorch's own step. ``generators`` hand their gradients to this
    optimizer from then on; their matrices must be in ``params``. The state dict is SGD's, brought up
    to date: a checkpoint of either optimizer resumes with the other.
    """

    def __init__(self, params: Iterable, generators: Sequence[GeneratedConv], window: int = 16, **kwargs) -> None:
        super().__init__(params, **kwargs)
        if window < 1:
            raise ValueError(f"window must be at least 1 step, got {window}")
        if any(g["maximize"] for g in self.param_groups):
            raise ValueError("CropSGD does not maximize")
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self.window, self.generators = window, list(generators)
        self._matrices: dict[int, list[_Lazy]] = {}  # id(generator) -> its weight2 and bias2
        for m in self.generators:
            m.crop_grads, m.crop_owner = [], self
            for p, factored in ((m.weight2, True), (m.bias2, False)):
                if id(p) not in group_of:
                    raise ValueError(f"a generator matrix of {m.spec.name} is in none of the parameter groups")
                last = torch.zeros(p.shape[:2], dtype=torch.long, device=p.device)
                self._matrices.setdefault(id(m), []).append(_Lazy(p, group_of[id(p)], factored, last))
        self._lazy = [z for zs in self._matrices.values() for z in zs]
        self._groups = sorted({z.group for z in self._lazy})
        self._products: dict[int, torch.Tensor] = {}  # group -> (window + 1, 2, 2): maps since each window step
        self._reset_window()

    def _reset_window(self) -> None:
        """Every element is up to date: the products restart from the identity."""
        self._steps = 0  # steps since the last flush
        for z in self._lazy:
            z.last.zero_()
            z.fresh = tuple(z.param.shape[:2])
            if z.group not in self._products:  # made on the device: nothing is copied from the host
                self._products[z.group] = torch.empty(self.window + 1, 2, 2, dtype=torch.float64,
                                                      device=z.param.device)
            self._products[z.group].copy_(torch.eye(2, dtype=torch.float64, device=z.param.device))
            if self.param_groups[z.group]["momentum"] and "momentum_buffer" not in self.state[z.param]:
                # a zero buffer is what PyTorch's first step starts from (no dampening hole)
                self.state[z.param]["momentum_buffer"] = torch.zeros_like(z.param)

    @property
    def pending_steps(self) -> int:
        """Steps since every element was last brought up to date (0: the weights are current everywhere)."""
        return self._steps

    def _buffer(self, z: _Lazy) -> torch.Tensor | None:
        return self.state[z.param]["momentum_buffer"] if self.param_groups[z.group]["momentum"] else None

    @torch.no_grad()
    def catch_up(self, generator: GeneratedConv, cout: int, cin: int) -> None:
        """Bring the ``[:cout, :cin]`` corner of ``generator``'s matrices up to date (it is about to be
        read or stepped): the part outside the corner already known to be so, as at most two boxes."""
        for z in self._matrices[id(generator)]:
            rows, cols = z.fresh
            for r0, r1, c0, c1 in ((rows, cout, 0, cin), (0, min(rows, cout), cols, cin)):
                if r1 > r0 and c1 > c0:
                    _catch_up_box(z.param, self._buffer(z), self._products[z.group], z.last, (r0, r1, c0, c1))
                    z.last[r0:r1, c0:c1] = self._steps
            if cout * cin > rows * cols:
                z.fresh = (cout, cin)

    def crop_gradients(self) -> list[torch.Tensor]:
        """The ``dw`` of every crop gradient since the last step (what GradScaler checks and unscales)."""
        return [g.dw for m in self.generators for g in m.crop_grads]

    def all_reduce_crop_gradients(self) -> None:
        """Average the crop gradients over the processes of a torchrun job, in one exchange: every
        process trained the same gene, so the corners agree and only ``dw`` differs (``hidden`` is a
        function of the gene and of weights that are the same everywhere)."""
        grads = [g for m in self.generators for g in m.crop_grads]
        if not grads or not (dist.is_available() and dist.is_initialized()):
            return
        flat = torch.cat([g.dw.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(dist.get_world_size())
        pieces = iter(torch.split(flat, [g.dw.numel() for g in grads]))
        for m in self.generators:
            m.crop_grads = [replace(g, dw=next(pieces).view_as(g.dw)) for g in m.crop_grads]

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for m in self.generators:
            m.crop_grads.clear()

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)  # every parameter with a .grad: all but the generator matrices
        if not self._lazy:
            return loss
        used = [m for m in self.generators if m.crop_grads]
        corners = {id(m): (max(g.cout for g in m.crop_grads), max(g.cin for g in m.crop_grads)) for m in used}
        for m in used:  # a no-op for the corner of a single generated gene, which was caught up to be read
            self.catch_up(m, *corners[id(m)])
        self._advance_products(getattr(self, "found_inf", None))
        for m in used:
            cout, cin = corners[id(m)]
            for z in self._matrices[id(m)]:
                _gradient_step(z.param, self._buffer(z), m.crop_grads, z.factored, cout, cin,
                               self.param_groups[z.group], getattr(self, "grad_scale", None),
                               getattr(self, "found_inf", None))
                z.last[:cout, :cin] = self._steps + 1
                z.fresh = (cout, cin)
            m.crop_grads.clear()
        self._steps += 1
        if self._steps == self.window:
            self.flush()
        return loss

    def _advance_products(self, found_inf: torch.Tensor | None) -> None:
        """Multiply this step's zero-gradient map into every window step's product (the identity when
        GradScaler skips the step). Every group's map comes in one small host-to-device copy, pinned so
        that the host does not wait for the device."""
        device = self._lazy[0].param.device
        maps = torch.tensor([step_map(self.param_groups[i]) for i in self._groups], dtype=torch.float64,
                            pin_memory=device.type == "cuda").to(device, non_blocking=True).view(-1, 2, 2)
        if found_inf is not None:
            skip = found_inf.to(device, torch.float64)
            maps = maps * (1 - skip) + torch.eye(2, dtype=torch.float64, device=device) * skip
        for k, i in enumerate(self._groups):
            products = self._products[i][:self._steps + 1]
            products.copy_(torch.matmul(maps[k], products))

    @torch.no_grad()
    def flush(self) -> None:
        """Bring every element of every generator matrix up to date."""
        if self._steps == 0:
            return
        for z in self._lazy:
            rows, cols = z.param.shape[:2]
            _catch_up_box(z.param, self._buffer(z), self._products[z.group], z.last, (0, rows, 0, cols))
        self._reset_window()

    def state_dict(self) -> dict:
        self.flush()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._reset_window()


def _rows_per_chunk(param: torch.Tensor, cols: int) -> int:
    """Rows of ``param[:, :cols]`` per chunk of an update: all of them on a GPU; on the CPU as many as
    keep a chunk's tensors in the cache."""
    if param.device.type != "cpu":
        return param.shape[0]
    return max(1, CPU_CHUNK // max(1, param[0, :cols].numel()))


def _catch_up_box(param: torch.Tensor, buf: torch.Tensor | None, products: torch.Tensor, last: torch.Tensor,
                  box: tuple[int, int, int, int]) -> None:
    """(w, m) <- products[last] (w, m) over rows ``r0:r1`` and columns ``c0:c1`` of ``param`` and of its
    momentum ``buf`` (None without momentum): each channel pair's maps since it was last up to date."""
    r0, r1, c0, c1 = box
    shape = (r1 - r0, c1 - c0) + (1,) * (param.dim() - 2)
    coef = products.to(param.dtype).view(-1, 4)[last[r0:r1, c0:c1]]  # (rows, cols, 4): one gather
    a, b, c, d = (coef[..., k].reshape(shape) for k in range(4))
    chunk = _rows_per_chunk(param, c1)
    for o0 in range(r0, r1, chunk):
        o1, k0, k1 = min(r1, o0 + chunk), o0 - r0, min(r1, o0 + chunk) - r0
        w = param[o0:o1, c0:c1]
        new_w = w * a[k0:k1]
        if buf is not None:
            m = buf[o0:o1, c0:c1]
            new_w.addcmul_(m, b[k0:k1])
            m.mul_(d[k0:k1]).addcmul_(w, c[k0:k1])
        w.copy_(new_w)


def _gradient_step(param: torch.Tensor, buf: torch.Tensor | None, grads: list[CropGrad], factored: bool, cout: int,
                   cin: int, group: dict, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
    """One SGD step of ``group`` on the ``[:cout, :cin]`` corner of ``param`` (up to date) with the crop
    gradients. Without GradScaler the gradient stays factored (each ``dw x hidden`` enters the update
    by ``addcmul``); with it, PyTorch's fused kernel, which unscales and skips on the device, takes the
    gradient built from the factors."""
    chunk = _rows_per_chunk(param, cin)
    for o0 in range(0, cout, chunk):
        o1 = min(cout, o0 + chunk)
        w, m = param[o0:o1, :cin], (buf[o0:o1, :cin] if buf is not None else None)
        parts = [(g, g.dw[o0:min(o1, g.cout)]) for g in grads if o0 < g.cout]
        if grad_scale is None and found_inf is None:
            _factored_step(w, m, parts, factored, group)
        else:
            grad = param.new_zeros(w.shape)
            for g, dw in parts:
                grad[:len(dw), :g.cin] += dw.unsqueeze(-1) * g.hidden if factored else dw
            # the kernel reads each tensor as contiguous memory: a corner of whole rows is, else its rows are
            pieces = (lambda t: [t]) if w.is_contiguous() else (lambda t: list(t.unbind(0)))
            torch._fused_sgd_(pieces(w), pieces(grad), pieces(m) if m is not None else [],
                              weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                              dampening=group["dampening"], nesterov=group["nesterov"], maximize=False,
                              is_first_step=False, grad_scale=grad_scale, found_inf=found_inf)


def _factored_step(w: torch.Tensor, m: torch.Tensor | None, parts: list[tuple[CropGrad, torch.Tensor]],
                   factored: bool, group: dict) -> None:
    """PyTorch's SGD step (see ``step_map``) in place on the rows ``w`` and momentum ``m``, with the
    gradient ``sum dw x hidden`` (or ``sum dw``) added where each part covers."""
    lr, wd, mu, keep = group["lr"], group["weight_decay"], group["momentum"], 1 - group["dampening"]

    def add_gradient(target: torch.Tensor, scale: float) -> None:
        for g, dw in parts:
            block = target[:len(dw), :g.cin]
            if factored:
                block.addcmul_(dw.unsqueeze(-1), g.hidden, value=scale)
            else:
                block.add_(dw, alpha=scale)

    if m is None:  # w -= lr (G + wd w)
        w.mul_(1 - lr * wd)
        add_gradient(w, -lr)
        return
    m.mul_(mu).add_(w, alpha=keep * wd)  # m = mu m + (1 - damp) (G + wd w)
    add_gradient(m, keep)
    if group["nesterov"]:  # w -= lr (G + wd w + mu m)
        w.mul_(1 - lr * wd).add_(m, alpha=-lr * mu)
        add_gradient(w, -lr)
    else:  # w -= lr m
        w.add_(m, alpha=-lr)


class CropGradScaler(torch.amp.GradScaler):
    """``GradScaler`` that also checks (and, in ``unscale_``, unscales) a ``CropSGD``'s crop gradients, so
    that an overflow in a generator's gradient skips the step and lowers the scale as any other does.
    (PyTorch's own FSDP scaler extends the same method for the same reason.)"""

    def _unscale_grads_(self, optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor, found_inf: torch.Tensor,
                        allow_fp16: bool) -> dict[torch.device, torch.Tensor]:
        per_device = super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        crops = optimizer.crop_gradients() if isinstance(optimizer, CropSGD) else []
        if crops:
            device = crops[0].device
            found = per_device.setdefault(device, found_inf.to(device))
            torch._amp_foreach_non_finite_check_and_unscale_(crops, found, inv_scale.to(device))
        return per_device

"""Linear operators ``A`` with ``forward``, ``adjoint``, ``normal`` (after sigpy's ``Linop``, written for torch).

Every operator is a :class:`Linop`: ``A.forward(x) = A x``, ``A.adjoint(y) = A^H y`` (defined by
``<A x, y> = <x, A^H y>`` with ``<a, b> = sum a conj(b)``), ``A.normal(x) = A^H A x``; ``A.H`` is the adjoint
as an operator (``A.H.H is A``), ``A.N`` the normal operator, ``A @ B`` (or ``A * B``) the composition
``A B`` ("A after B"), and ``A(x)``, ``A @ x`` and ``A * x`` apply ``A``. ``forward`` and ``normal`` check
``x`` against ``A.ishape``, ``adjoint`` checks ``y`` against ``A.oshape``, and a mismatch raises
:class:`ShapeError` naming the expected and the received shape. In a shape, ``None`` is "any size" (fixed
by neither maps nor mask); on the batch axis (axis 0) a size of 1 broadcasts on either side, as in torch.

Shapes (batched over slices ``B`` and coils ``C``; all complex64 unless stated):

* image ``x``: ``(B, H, W)``; coil maps ``S``: ``(B, C, H, W)`` (any of ``B``, ``H``, ``W`` may be 1 and
  broadcast); multi-coil k-space ``y``: ``(B, C, H, W)``.
* mask ``M``: real or bool, 0/1, its last two axes ``(H, W)`` for a 2-D mask or ``(1, W)`` for a 1-D line
  mask (phase-encode lines are columns, the last axis, as in fastMRI). A leading batch axis is optional:
  ``(W,)``, ``(1, W)``, ``(H, W)``, ``(B, 1, W)`` and ``(B, H, W)`` all broadcast.

``A = M F S`` (:class:`SenseOp`, multi-coil SENSE), ``A = M F`` (:class:`SingleCoilOp`: SENSE with one unit
map, the coil axis dropped), ``A = M *`` (:class:`InpaintOp`, image-domain inpainting).
"""

from __future__ import annotations

import torch

from .fft import fft2c, ifft2c

Shape = tuple  # of int | None; None = any size


class ShapeError(ValueError):
    """An array's shape does not match the shape an operator declares (expected vs got in the message)."""


def _fmt(shape) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _fits(got, expected) -> bool:
    """Shapes ``got`` and ``expected`` agree: same number of axes; on each axis the sizes are equal or one
    is unknown (``None``); on the batch axis (axis 0) a size of 1 broadcasts."""
    if len(got) != len(expected):
        return False
    return all(g is None or e is None or g == e or (i == 0 and 1 in (g, e))
               for i, (g, e) in enumerate(zip(got, expected)))


def _joint(a: int | None, b: int | None, what: str, owner: str) -> int | None:
    """The size two parameters agree on along one axis (1 and ``None`` broadcast); ShapeError otherwise."""
    a, b = (None if a == 1 else a), (None if b == 1 else b)
    if a is not None and b is not None and a != b:
        raise ShapeError(f"{owner}: {what} sizes {a} and {b} do not broadcast")
    return a if a is not None else b


def as_mask(mask, like: torch.Tensor) -> torch.Tensor:
    """Return ``mask`` as a real tensor of shape ``(B or 1, H or 1, W)`` on ``like``'s device."""
    m = torch.as_tensor(mask, device=like.device)
    if m.ndim == 1:
        m = m[None]
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"mask must have 1 to 3 axes (got shape {tuple(m.shape)})")
    return m.to(like.real.dtype)


class Linop:
    """A linear operator ``A: C^ishape -> C^oshape``.

    Subclasses set ``ishape``/``oshape`` (tuples; ``None`` = any size) and implement ``_forward`` and
    ``_adjoint`` (and ``_normal`` when ``A^H A`` has a cheaper form than ``_adjoint(_forward(x))``).
    """

    ishape: Shape = ()
    oshape: Shape = ()

    # -- what subclasses implement
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _normal(self, x: torch.Tensor) -> torch.Tensor:
        return self._adjoint(self._forward(x))

    # -- checked application
    def _check(self, t: torch.Tensor, expected: Shape, method: str, role: str) -> None:
        if not _fits(tuple(t.shape), expected):
            raise ShapeError(f"{self.name}.{method}: {role} shape {tuple(t.shape)} does not match the expected "
                             f"{_fmt(expected)} (* = any size; a batch of 1 broadcasts)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x``: ``ishape`` -> ``oshape``."""
        self._check(x, self.ishape, "forward", "input")
        return self._forward(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A^H y``: ``oshape`` -> ``ishape``."""
        self._check(y, self.oshape, "adjoint", "input")
        return self._adjoint(y)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``A^H A x``: ``ishape`` -> ``ishape``."""
        self._check(x, self.ishape, "normal", "input")
        return self._normal(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    # -- operators built from operators
    @property
    def H(self) -> Linop:
        """The adjoint ``A^H`` as an operator (``oshape`` -> ``ishape``); ``A.H.H`` is ``A``."""
        return Adjoint(self, "H", self.oshape, self.ishape)

    @property
    def N(self) -> Linop:
        """The normal operator ``A^H A`` (``ishape`` -> ``ishape``, self-adjoint)."""
        return Normal(self, "N", self.ishape, self.ishape)

    def __matmul__(self, other):
        if isinstance(other, Linop):
            return Compose(self, other)
        if isinstance(other, torch.Tensor):
            return self.forward(other)
        return NotImplemented

    __mul__ = __matmul__

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"<{self.name}: {_fmt(self.oshape)} <- {_fmt(self.ishape)}>"


class _Derived(Linop):
    """An operator made from one :class:`Linop` ``op`` (its adjoint, its normal), named ``<op>.<suffix>``."""

    def __init__(self, op: Linop, suffix: str, ishape: Shape, oshape: Shape):
        self.op, self.suffix, self.ishape, self.oshape = op, suffix, ishape, oshape

    @property
    def name(self) -> str:
        return f"{self.op.name}.{self.suffix}"


class Adjoint(_Derived):
    """``A^H`` of a :class:`Linop` ``A`` (``A.H``): forward is ``A.adjoint``, adjoint is ``A.forward``."""

    def _forward(self, y):
        return self.op._adjoint(y)

    def _adjoint(self, x):
        return self.op._forward(x)

    @property
    def H(self) -> Linop:
        return self.op


class Normal(_Derived):
    """``A^H A`` of a :class:`Linop` ``A`` (``A.N``): self-adjoint, so forward = adjoint = ``A.normal``."""

    def _forward(self, x):
        return self.op._normal(x)

    _adjoint = _forward

    @property
    def H(self) -> Linop:
        return self


class Compose(Linop):
    """``A_1 A_2 ... A_n x`` (``A_n`` applied first); ``(A_1 ... A_n)^H = A_n^H ... A_1^H``.

    ``Compose(A, B)`` is ``A @ B``; nested compositions are flattened. Each factor checks its own input.
    """

    def __init__(self, *ops: Linop):
        flat = []
        for op in ops:
            flat += op.ops if isinstance(op, Compose) else [op]
        for outer, inner in zip(flat[:-1], flat[1:]):
            if not _fits(inner.oshape, outer.ishape):
                raise ShapeError(f"cannot compose {outer.name} after {inner.name}: {inner.name} gives "
                                 f"{_fmt(inner.oshape)}, {outer.name} expects {_fmt(outer.ishape)}")
        self.ops, self.ishape, self.oshape = flat, flat[-1].ishape, flat[0].oshape

    def _forward(self, x):
        for op in reversed(self.ops):
            x = op.forward(x)
        return x

    def _adjoint(self, y):
        for op in self.ops:
            y = op.adjoint(y)
        return y

    @property
    def H(self) -> Linop:
        return Compose(*[op.H for op in reversed(self.ops)])

    @property
    def name(self) -> str:
        return " @ ".join(op.name for op in self.ops)


class SenseOp(Linop):
    """Multi-coil Cartesian SENSE, ``A = M F S``:

    ``A x = M F (S x)``, ``(B, H, W)`` -> ``(B, C, H, W)``;
    ``A^H y = sum_c conj(S_c) F^-1 (M y_c)``, ``(B, C, H, W)`` -> ``(B, H, W)``;
    ``A^H A x = sum_c conj(S_c) F^-1 M F (S_c x)`` (``M`` is 0/1, so ``M^H M = M`` is applied once).

    ``maps`` ``S``: ``(B|1, C, H|1, W|1)``; ``mask``: any form of the module docstring, kept as ``.mask``
    ``(B|1, 1, H|1, W)``. ``ishape = (B, H, W)``, ``oshape = (B, C, H, W)`` with the sizes the maps and
    the mask fix (``None`` where both broadcast).
    """

    def __init__(self, maps: torch.Tensor, mask):
        if maps.ndim != 4:
            raise ShapeError(f"SenseOp: maps shape {tuple(maps.shape)} does not match the expected (B, C, H, W)")
        self.maps = maps
        self.mask = as_mask(mask, maps)[:, None]  # (B|1, 1, H|1, W)
        B, H, W = (_joint(maps.shape[a], self.mask.shape[a], f"maps and mask {n}", self.name)
                   for a, n in ((0, "batch"), (2, "H"), (3, "W")))
        self.ishape, self.oshape = (B, H, W), (B, maps.shape[1], H, W)

    def _forward(self, x):
        return self.mask * fft2c(self.maps * x[:, None])

    def _adjoint(self, y):
        return torch.sum(self.maps.conj() * ifft2c(self.mask * y), dim=1)

    def _normal(self, x):
        return torch.sum(self.maps.conj() * ifft2c(self.mask * fft2c(self.maps * x[:, None])), dim=1)


class SingleCoilOp(SenseOp):
    """Single-coil Cartesian, ``A = M F``: :class:`SenseOp` with one unit coil map and the coil axis dropped.

    ``A x = M F x``, ``A^H y = F^-1 (M y)``, ``A^H A x = F^-1 M F x``; image and k-space ``(B, H, W)``.
    ``like`` fixes the device and the complex dtype of the unit map (default CPU complex64); the mask
    follows the input's device, as it did before this was a subclass.
    """

    def __init__(self, mask, like: torch.Tensor | None = None):
        like = like if like is not None else torch.zeros((), dtype=torch.complex64)
        dtype = like.dtype if like.is_complex() else torch.complex64
        super().__init__(torch.ones((1, 1, 1, 1), dtype=dtype, device=like.device), mask)
        self.oshape = self.ishape

    def _follow(self, t):
        if self.mask.device != t.device:
            self.maps, self.mask = self.maps.to(t.device), self.mask.to(t.device)

    def _forward(self, x):
        self._follow(x)
        return super()._forward(x)[:, 0]

    def _adjoint(self, y):
        self._follow(y)
        return super()._adjoint(y[:, None])

    def _normal(self, x):
        self._follow(x)
        return super()._normal(x)


class InpaintOp(Linop):
    """Image-domain corruption (missing pixels or boxes), ``A x = M * x``: self-adjoint, and ``A^H A = A``
    for a 0/1 mask. ``mask`` ``(B|1, H|1, W)`` (as in the module docstring); image ``(B, H, W)`` in and out."""

    def __init__(self, mask, like: torch.Tensor | None = None):
        self.mask = as_mask(mask, like if like is not None else torch.zeros((), dtype=torch.complex64))
        self.ishape = self.oshape = tuple(None if n == 1 and a < 2 else n for a, n in enumerate(self.mask.shape))

    def _forward(self, x):
        return self.mask.to(x.device) * x

    _adjoint = _forward
    _normal = _forward


def conjugate_gradient(normal, rhs: torch.Tensor, x0: torch.Tensor | None = None, lam: float = 0.0,
                       iters: int = 30, tol: float = 0.0) -> torch.Tensor:
    """Solve ``(N + lam I) x = rhs`` for Hermitian positive (semi-)definite ``N`` by batched CG.

    ``normal``: callable ``x -> N x`` on ``(B, H, W)`` (``A.normal`` or ``A.N`` of a :class:`Linop` ``A``); each batch item is solved independently (its own
    step sizes) and stops updating once its residual norm is below ``max(tol, 10 eps) ||rhs||`` (``eps``
    of the dtype: further steps on a converged, possibly singular, system only amplify rounding).
    ``x0`` is the starting point (zeros by default).
    """
    dims = tuple(range(1, rhs.ndim))

    def op(v):
        return normal(v) + lam * v if lam else normal(v)

    def sq(v):
        return torch.sum(v.abs() ** 2, dim=dims, keepdim=True)

    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    r = rhs - op(x) if x0 is not None else rhs.clone()
    p = r.clone()
    rr = sq(r)
    rel = max(tol, 10 * torch.finfo(rhs.real.dtype).eps)
    stop = rel**2 * sq(rhs)
    for _ in range(iters):
        active = rr > stop
        if not torch.any(active):
            break
        Ap = op(p)
        pAp = torch.sum((p.conj() * Ap).real, dim=dims, keepdim=True)
        ok = active & (pAp > 0)
        alpha = torch.where(ok, rr / torch.where(ok, pAp, torch.ones_like(pAp)), torch.zeros_like(rr))
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = sq(r)
        beta = torch.where(ok, rr_new / torch.where(ok, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        p = torch.where(ok, r + beta * p, p)
        rr = torch.where(ok, rr_new, rr)
    return x

"""One op interface per kernel family: one signature, an explicit table, one resolver.

A kernel family (attention, Monarch matmul, mixed-chunk attention) is an :class:`Op` built in the
family's ``api.py`` from an explicit table of implementations and the default order per backend.
Its public function checks the arguments once (one set of checks, one set of messages) into one
frozen call value and hands it to the op, which runs the requested :class:`Implementation` or,
for ``'auto'``, the first one in the preference order of the platform the program is compiled
for (:func:`pallas_kernels._compat.backend_kind`) that accepts the call. An
implementation refuses a call it cannot honour by raising :class:`Unsupported` (a
``NotImplementedError``) *before* doing any work; ``'auto'`` then falls through to the next one,
and an explicitly requested implementation turns the refusal into a ``ValueError`` that says why.
Nothing is silently ignored.

Implementations are frozen dataclasses, so a configured one (``PallasTritonAttention(
block_sizes=..., interpret=True)``) is a hashable value a Flax module can hold as an attribute.
The pattern follows tokamax's ``ops/<family>/{api, base, xla, pallas_triton, ...}``.

Forward-mode autodiff: Pallas kernels are differentiated through ``jax.custom_vjp`` (their
backward is a kernel too), and JAX cannot push a ``jax.jvp`` through a ``custom_vjp``. Inside
:func:`forward_mode_autodiff` every op runs an implementation that declares
``supports_forward_mode`` (the XLA path: the same numbers, differentiable in every mode); the
sharpness probes (Hessian-vector products, forward-over-reverse) enter it, so they measure
models built from efflax's own layers. The choice is made when a function is traced.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import ClassVar

from pallas_kernels._compat import backend_kind

__all__ = [
    "Implementation",
    "Op",
    "Unsupported",
    "forward_mode_autodiff",
    "forward_mode_required",
]


class Unsupported(NotImplementedError):
    """Raised by an implementation for a call it cannot honour; ``'auto'`` tries the next one."""


_FORWARD_MODE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "efflax_forward_mode_autodiff", default=False
)


@contextlib.contextmanager
def forward_mode_autodiff() -> Iterator[None]:
    """Inside this context every op uses an implementation that ``jax.jvp`` can differentiate.

    Use it around code that is *traced* with forward-mode autodiff (``jax.jvp``,
    ``jax.jacfwd``, Hessian-vector products) through efflax layers; efflax's sharpness probes
    enter it themselves. Implementations are chosen at trace time: a function that ``jax.jit``
    already traced outside the context keeps its compiled kernels.

    Example:
      >>> with forward_mode_autodiff():
      ...     tangent_out = jax.jvp(lambda p: model.apply(p, x), (params,), (tangent,))[1]
    """
    token = _FORWARD_MODE.set(True)
    try:
        yield
    finally:
        _FORWARD_MODE.reset(token)


def forward_mode_required() -> bool:
    """Whether the caller is inside :func:`forward_mode_autodiff`."""
    return _FORWARD_MODE.get()


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to compute an op. Subclasses are frozen dataclasses holding their configuration.

    Class attributes:
      name: the registry name (``'xla'``, ``'pallas_triton'``, ``'cudnn'``, ``'reference'``).
      platforms: backend kinds (``'cpu'``, ``'gpu'``, ``'tpu'``) it runs on; ``None``: all.
      supports_forward_mode: ``jax.jvp`` can differentiate it (no ``custom_vjp`` inside).

    Subclasses implement ``__call__(call)``: ``call`` is the family's one normalised call
    value (``AttentionCall``, ``MonarchCall``, ``MixedChunkCall``), built once by the family's
    checks; they raise :class:`Unsupported` (before computing anything) for what they cannot do.
    """

    name: ClassVar[str] = ""
    platforms: ClassVar[tuple[str, ...] | None] = None
    supports_forward_mode: ClassVar[bool] = True

    def check_platform(self, backend: str | None = None) -> None:
        """Raises :class:`Unsupported` when this implementation cannot run on ``backend``."""
        kind = backend_kind(backend)
        if self.platforms is not None and kind not in self.platforms:
            raise Unsupported(f"{self.name!r} runs on {'/'.join(self.platforms)}, not {kind!r}")

    def __call__(self, call: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class Op:
    """A kernel family: its table of implementations and the order ``'auto'`` tries them in.

    The table is written out, in one place, by the family's public module
    (``pallas_kernels/<family>/api.py``); nothing registers itself by being imported.

    Args:
      name: the family, for messages (``'dot_product_attention'``).
      implementations: the default-configured implementation of every name.
      auto_order: backend kind -> implementation names in preference order; the key ``'*'``
        is the default for other backends.
      aliases: extra accepted names (``{'pallas': 'pallas_triton'}``).
    """

    def __init__(
        self,
        name: str,
        *,
        implementations: Sequence[Implementation],
        auto_order: Mapping[str, Sequence[str]],
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        if "*" not in auto_order:
            raise ValueError(f"auto_order of {name!r} needs a '*' entry")
        self.name = name
        self._table: dict[str, Implementation] = {}
        for implementation in implementations:
            if not implementation.name or implementation.name in self._table:
                raise ValueError(f"{implementation!r} has no name or a name already in the table")
            self._table[implementation.name] = implementation
        self.auto_order = {k: tuple(v) for k, v in auto_order.items()}
        self.aliases = dict(aliases or {})
        for names in (*self.auto_order.values(), self.aliases.values()):
            unknown = set(names) - set(self._table)
            if unknown:
                raise ValueError(f"{name}: {sorted(unknown)} are not in the table")

    @property
    def implementations(self) -> dict[str, Implementation]:
        """The table: implementations by name (default configurations)."""
        return dict(self._table)

    @property
    def names(self) -> tuple[str, ...]:
        """Every accepted value of ``implementation=``: ``'auto'``, names and aliases."""
        return ("auto", *self._table, *self.aliases)

    def get(self, implementation: str | Implementation) -> Implementation:
        """The implementation an ``implementation=`` value names (not ``'auto'``)."""
        if isinstance(implementation, Implementation):
            listed = self._table.get(implementation.name)
            if listed is None or not isinstance(implementation, type(listed)):
                raise ValueError(
                    f"implementation={implementation!r} is not an implementation of {self.name}; "
                    f"the table has {sorted(self._table)}"
                )
            return implementation
        if not isinstance(implementation, str):
            raise ValueError(
                f"implementation={implementation!r} must be a name ({', '.join(self.names)}) or "
                "an Implementation instance"
            )
        name = self.aliases.get(implementation, implementation)
        if name not in self._table:
            raise ValueError(
                f"implementation={implementation!r} is not one of {', '.join(self.names)} "
                f"(op {self.name})"
            )
        return self._table[name]

    def _order(self, kind: str) -> list[Implementation]:
        return [self._table[n] for n in self.auto_order.get(kind, self.auto_order["*"])]

    def candidates(
        self, implementation: str | Implementation = "auto", backend: str | None = None
    ) -> list[Implementation]:
        """What :meth:`__call__` will try, in order, for ``implementation`` on ``backend``.

        ``'auto'`` gives the preference order of the platform the program is compiled for
        (:func:`pallas_kernels._compat.backend_kind`). Inside :func:`forward_mode_autodiff` an
        implementation without forward-mode support is replaced by the ones of the auto order
        that have it.
        """
        kind = backend_kind(backend)
        if isinstance(implementation, str) and implementation == "auto":
            chosen = self._order(kind)
        else:
            chosen = [self.get(implementation)]
        if forward_mode_required() and not all(c.supports_forward_mode for c in chosen):
            chosen = [c for c in [*chosen, *self._order(kind)] if c.supports_forward_mode]
            chosen = list(dict.fromkeys(chosen))
        return chosen

    def __call__(
        self,
        call: Any,
        implementation: str | Implementation = "auto",
        *,
        backend: str | None = None,
    ) -> Any:
        """Runs the first candidate that accepts the normalised ``call`` value.

        Raises:
          ValueError: an explicitly requested implementation refused the call, or every
            candidate of ``'auto'`` did (the message gives each one's reason).
        """
        explicit = not (isinstance(implementation, str) and implementation == "auto")
        candidates = self.candidates(implementation, backend)
        reasons = []
        for candidate in candidates:
            try:
                candidate.check_platform(backend)
                return candidate(call)
            except Unsupported as e:
                reasons.append(f"{candidate.name}: {e}")
            except TypeError as e:
                if candidate.supports_forward_mode or "forward-mode autodiff" not in str(e):
                    raise
                raise TypeError(
                    f"{self.name}: implementation {candidate.name!r} has a custom VJP and no "
                    "forward-mode rule, so jax.jvp (and Hessian-vector products) cannot "
                    "differentiate it. Run the forward-mode code inside "
                    "pallas_kernels.op.forward_mode_autodiff() (efflax.optim.hvp/sharpness do), "
                    "where every op runs an implementation that supports it, or pick one "
                    "(e.g. implementation='xla')"
                ) from e
        if not candidates:
            reasons.append("no implementation supports forward-mode autodiff")
        requested = implementation if isinstance(implementation, str) else implementation.name
        what = f"implementation={requested!r}" if explicit else "no implementation"
        raise ValueError(f"{self.name}: {what} cannot run this call ({'; '.join(reasons)})")

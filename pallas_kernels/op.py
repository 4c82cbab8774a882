"""One op interface per kernel family: one signature, registered implementations, one resolver.

A kernel family (attention, Monarch matmul, mixed-chunk attention) is an :class:`Op`. Its public
function checks the arguments once (one set of checks, one set of messages) and hands the
normalised call to :meth:`Op.dispatch`, which runs the requested :class:`Implementation` or, for
``'auto'``, the first one in the backend's preference order that accepts the call. An
implementation refuses a call it cannot honour by raising :class:`Unsupported` (a
``NotImplementedError``) *before* doing any work; ``'auto'`` then falls through to the next one,
and an explicitly requested implementation turns the refusal into a ``ValueError`` that says why.
Nothing is silently ignored.

Implementations are frozen dataclasses, so a configured one (``PallasTritonAttention(
block_sizes=..., interpret=True)``) is a hashable value a Flax module can hold as an attribute.
The pattern follows tokamax's ``ops/<family>/{base, xla, pallas_triton, ...}``.

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

    Subclasses implement ``__call__`` with the op's normalised arguments and raise
    :class:`Unsupported` (before computing anything) for what they cannot do.
    """

    name: ClassVar[str] = ""
    platforms: ClassVar[tuple[str, ...] | None] = None
    supports_forward_mode: ClassVar[bool] = True

    def check_platform(self, backend: str | None = None) -> None:
        """Raises :class:`Unsupported` when this implementation cannot run on ``backend``."""
        kind = backend_kind(backend)
        if self.platforms is not None and kind not in self.platforms:
            raise Unsupported(f"{self.name!r} runs on {'/'.join(self.platforms)}, not {kind!r}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class Op:
    """A kernel family: its implementations and the order ``'auto'`` tries them in.

    Args:
      name: the family, for messages (``'dot_product_attention'``).
      auto_order: backend kind -> implementation names in preference order; the key ``'*'``
        is the default for other backends.
      aliases: extra accepted names (``{'pallas': 'pallas_triton'}``).
    """

    def __init__(
        self,
        name: str,
        *,
        auto_order: Mapping[str, Sequence[str]],
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        if "*" not in auto_order:
            raise ValueError(f"auto_order of {name!r} needs a '*' entry")
        self.name = name
        self.auto_order = {k: tuple(v) for k, v in auto_order.items()}
        self.aliases = dict(aliases or {})
        self._registry: dict[str, Implementation] = {}

    def register(self, implementation: Implementation) -> Implementation:
        """Registers the default-configured ``implementation`` under its ``name``."""
        if not implementation.name:
            raise ValueError(f"{type(implementation).__name__} has no name")
        self._registry[implementation.name] = implementation
        return implementation

    @property
    def implementations(self) -> dict[str, Implementation]:
        """Registered implementations by name (default configurations)."""
        return dict(self._registry)

    @property
    def names(self) -> tuple[str, ...]:
        """Every accepted value of ``implementation=``: ``'auto'``, names and aliases."""
        return ("auto", *self._registry, *self.aliases)

    def get(self, implementation: str | Implementation) -> Implementation:
        """The implementation an ``implementation=`` value names (not ``'auto'``)."""
        if isinstance(implementation, Implementation):
            registered = self._registry.get(implementation.name)
            if registered is None or not isinstance(implementation, type(registered)):
                raise ValueError(
                    f"implementation={implementation!r} is not an implementation of {self.name}; "
                    f"registered: {sorted(self._registry)}"
                )
            return implementation
        if not isinstance(implementation, str):
            raise ValueError(
                f"implementation={implementation!r} must be a name ({', '.join(self.names)}) or "
                "an Implementation instance"
            )
        name = self.aliases.get(implementation, implementation)
        if name not in self._registry:
            raise ValueError(
                f"implementation={implementation!r} is not one of {', '.join(self.names)} "
                f"(op {self.name})"
            )
        return self._registry[name]

    def candidates(
        self, implementation: str | Implementation = "auto", backend: str | None = None
    ) -> list[Implementation]:
        """What :meth:`dispatch` will try, in order, for ``implementation`` on ``backend``.

        ``'auto'`` gives the backend's preference order. Inside :func:`forward_mode_autodiff`
        an implementation without forward-mode support is replaced by the ones of the auto
        order that have it.
        """
        kind = backend_kind(backend)
        if isinstance(implementation, str) and implementation == "auto":
            order = self.auto_order.get(kind, self.auto_order["*"])
            chosen = [self._registry[n] for n in order if n in self._registry]
        else:
            chosen = [self.get(implementation)]
        if forward_mode_required() and not all(c.supports_forward_mode for c in chosen):
            order = self.auto_order.get(kind, self.auto_order["*"])
            fallback = [self._registry[n] for n in order if n in self._registry]
            chosen = [c for c in [*chosen, *fallback] if c.supports_forward_mode]
            chosen = list(dict.fromkeys(chosen))
        return chosen

    def dispatch(
        self,
        implementation: str | Implementation,
        *args: Any,
        backend: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Runs the first candidate that accepts the call.

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
                return candidate(*args, **kwargs)
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

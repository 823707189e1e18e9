"""The inner loop's meta-parameters besides the initialization, shared by every recipe.

* ``--learn-lr``: the inner step size becomes a meta-parameter, trained by the same
  outer optimizer as the network and used at meta-test time:

  - ``scalar``: one rate (a 0-dim tensor);
  - ``per-step``: one rate per inner step, a ``(K,)`` tensor (MAML++, Antoniou et
    al., 2019); test-time steps past K reuse the last learned rate;
  - ``per-parameter``: one rate per entry of every adapted parameter, tensors shaped
    like them (Meta-SGD, Li et al., 2017).

  Every learned rate starts at the configured ``--inner-lr``. ``off`` (the default)
  keeps the fixed float.
* ``--anil``: only the last layer adapts in the inner loop (ANIL, Raghu et al., 2020);
  the body is passed to the loss unchanged and gets its meta-gradient through the inner
  loop (``tmg.adapt(..., adapt=names)``).

A recipe opts in by deriving its config from :class:`InnerConfig` (the two options);
the shared runner builds an :class:`InnerParams` for the model (:meth:`InnerParams.build`),
hands its rates to the outer optimizer, passes ``lr=`` / ``adapt=`` to ``tmg.adapt``,
saves it in checkpoints and gives it to the problem's evaluation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

import torchopt_metagrad as tmg
from recipes.common.config import TrainConfig, option
from recipes.common.methods import Method

__all__ = [
    "LEARN_LR",
    "InnerConfig",
    "InnerParams",
    "check_method",
    "inner_options",
    "last_layer",
    "make_inner_optimizer",
]

#: Values of ``--learn-lr``.
LEARN_LR = ("off", "scalar", "per-step", "per-parameter")
#: torchopt functional optimizers ``--inner-optimizer`` may name.
INNER_OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")

#: A step size as ``tmg.adapt`` takes it: float, 0-dim, ``(K,)`` or ``{name: tensor}``.
Lr = float | Tensor | dict[str, Tensor]


@dataclasses.dataclass(frozen=True)
class InnerConfig(TrainConfig):
    """:class:`TrainConfig` plus the inner loop's meta-parameters (learned lr, ANIL)."""

    learn_lr: str = option(
        "off",
        "learn the inner step size, initialised at --inner-lr: scalar (one rate), per-step "
        "(one per inner step, MAML++), per-parameter (one per weight, Meta-SGD); off: fixed",
        choices=LEARN_LR,
    )
    anil: bool = option(
        False, "adapt only the last layer in the inner loop (ANIL); the body is meta-learned"
    )
    inner_optimizer: str = option(
        "sgd",
        "inner optimizer at --inner-lr: sgd (plain gradient descent), or a torchopt "
        "functional optimizer name[:key=value,...], e.g. sgd:momentum=0.9, adam, "
        "adam:betas=0.5/0.999 (a fixed lr only)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.learn_lr not in LEARN_LR:
            raise ValueError(
                f"--learn-lr must be one of {', '.join(LEARN_LR)}, got {self.learn_lr!r}"
            )
        optimizer = make_inner_optimizer(self.inner_optimizer, self.inner_lr)
        if optimizer is not None and self.learn_lr != "off":
            raise ValueError(
                f"--learn-lr {self.learn_lr} needs --inner-optimizer sgd (a learned rate is a "
                "plain gradient step's)"
            )


def inner_options(config: TrainConfig) -> tuple[str, bool, str]:
    """``(learn_lr, anil, inner_optimizer)`` of ``config``; ``("off", False, "sgd")`` for a
    config without them."""
    if isinstance(config, InnerConfig):
        return config.learn_lr, config.anil, config.inner_optimizer
    return "off", False, "sgd"


def make_inner_optimizer(spec: str, lr: float) -> Any:
    """``--inner-optimizer``'s torchopt ``GradientTransformation`` at ``lr``, or ``None``
    for plain gradient descent (``sgd`` without knobs: ``tmg.adapt``'s ``lr=``).

    Values are ints, floats, ``true``/``false``, or ``a/b`` for a tuple of floats.

    Raises:
        ValueError: an unknown optimizer or knob, naming the option.
    """
    import torchopt

    name, _, rest = spec.partition(":")
    if name not in INNER_OPTIMIZERS:
        raise ValueError(
            f"--inner-optimizer: unknown optimizer {name!r}; one of {', '.join(INNER_OPTIMIZERS)}"
        )
    kwargs: dict[str, Any] = {}
    for item in filter(None, (i.strip() for i in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--inner-optimizer {spec}: expected key=value, got {item!r}")
        kwargs[key.strip()] = _knob_value(value.strip())
    if name == "sgd" and not kwargs:
        return None
    try:
        return getattr(torchopt, name)(lr, **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--inner-optimizer {spec}: {err}") from None


def _knob_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if "/" in text:
        return tuple(float(v) for v in text.split("/"))
    try:
        return int(text)
    except ValueError:
        return float(text)


def last_layer(model: nn.Module) -> list[str]:
    """Names (as in ``named_parameters``) of the parameters of the last module that owns any.

    For ``nn.Sequential(Linear, ReLU, Linear, ReLU, Linear)`` that is the last
    ``Linear``'s ``weight`` and ``bias`` (modules in registration order).
    """
    last: list[str] = []
    for prefix, module in model.named_modules():
        own = [name for name, _ in module.named_parameters(recurse=False)]
        if own:
            last = [f"{prefix}.{name}" if prefix else name for name in own]
    if not last:
        raise ValueError("--anil: the model has no parameters")
    return last


def check_method(
    method: Method, learn_lr: str, anil: bool, steps: int, optimizer: str = "sgd"
) -> None:
    """Raise ``ValueError`` (naming the flag) if ``method`` cannot train these meta-parameters
    or step with this inner optimizer.

    Outer directions (Reptile) and ``flow=`` methods are refused here. For a rule,
    ``tmg.adapt`` runs once on a toy two-layer problem with a learned rate of the
    same kind, the same kind of adapt list, or the inner optimizer, so the library's own
    message says why a rule refuses them (e.g. ``ImplicitCG`` and a learned lr); nothing
    here names a rule.
    """
    if learn_lr not in LEARN_LR:
        raise ValueError(f"--learn-lr must be one of {', '.join(LEARN_LR)}, got {learn_lr!r}")
    probes = [(f"--learn-lr {learn_lr}", learn_lr, False)] if learn_lr != "off" else []
    probes += [("--anil", "off", True)] if anil else []
    inner_opt = make_inner_optimizer(optimizer, 0.1)
    if inner_opt is not None:
        probes += [(f"--inner-optimizer {optimizer}", "off", False)]
    if not probes:
        return
    flags = " and ".join(flag for flag, _, _ in probes)
    verb = "need" if len(probes) > 1 else "needs"
    if not method.is_rule:
        what = "a learned lr" if learn_lr != "off" else "ANIL's body" if anil else "the optimizer"
        raise ValueError(
            f"{flags} {verb} a meta-gradient rule, not {method.display!r}: its outer "
            f"direction is not a derivative of the query loss, so it gives {what} no direction"
        )
    if method.flow is not None:
        raise ValueError(
            f"{flags}: flow= solves a gradient flow (no step size to learn, all parameters "
            "flow); drop flow= to use them"
        )
    steps = method.steps or steps
    toy = nn.Sequential(nn.utils.skip_init(nn.Linear, 2, 2), nn.utils.skip_init(nn.Linear, 2, 1))
    with torch.no_grad():  # fixed values: the probe draws nothing from the global RNG
        for p in toy.parameters():
            p.fill_(0.5)

    def loss(params: dict[str, Tensor], batch: Any) -> Tensor:
        return torch.func.functional_call(toy, params, (torch.ones(1, 2),)).square().sum()

    for flag, mode, partial in probes:  # one at a time, so the message names the flag
        inner = InnerParams.build(toy, learn_lr=mode, anil=partial, steps=steps, lr=0.1)
        opt = inner_opt if flag.startswith("--inner-optimizer") else None
        try:
            out = tmg.adapt(
                loss, dict(toy.named_parameters()), None, steps=steps,
                lr=None if opt is not None else inner.lr(), optimizer=opt,
                rule=method.build_rule(), adapt=inner.adapt,
            )  # fmt: skip
            loss(out, None).backward()
        except (TypeError, ValueError) as err:
            raise ValueError(f"{flag} with {method.display}: {err}") from None


class InnerParams:
    """The inner loop's step size (fixed or learned) and which parameters adapt.

    Attributes:
        mode: ``off``, ``scalar``, ``per-step`` or ``per-parameter``.
        base_lr: the configured inner lr (the fixed rate, or the learned ones' start).
        adapt: the adapted names, or ``None`` for all (``tmg.adapt``'s ``adapt=``).
        tensors: the learned rates (leaves that require grad), by name: ``{"lr": t}``
            for ``scalar`` / ``per-step``, ``{param name: t}`` for ``per-parameter``;
            empty when ``off``.
        optimizer: the inner torchopt optimizer (``tmg.adapt``'s ``optimizer=``), or
            ``None`` for plain gradient descent at :meth:`lr`.
    """

    def __init__(
        self,
        mode: str,
        base_lr: float,
        adapt: list[str] | None,
        tensors: dict[str, Tensor],
        optimizer: Any = None,
    ) -> None:
        self.mode, self.base_lr, self.adapt, self.tensors = mode, base_lr, adapt, tensors
        self.optimizer = optimizer

    @classmethod
    def build(
        cls,
        model: nn.Module,
        *,
        learn_lr: str,
        anil: bool,
        steps: int,
        lr: float,
        optimizer: str = "sgd",
    ) -> InnerParams:
        """The step size, adapt list and inner optimizer for ``model``, rates initialised
        at ``lr``.

        The rates take the device and dtype of the model's parameters.
        """
        params = dict(model.named_parameters())
        adapt = last_layer(model) if anil else None
        names = adapt if adapt is not None else list(params)
        ref = params[names[0]]
        like = {"device": ref.device, "dtype": ref.dtype}
        if learn_lr == "off":
            tensors: dict[str, Tensor] = {}
        elif learn_lr == "scalar":
            tensors = {"lr": torch.tensor(float(lr), **like)}
        elif learn_lr == "per-step":
            tensors = {"lr": torch.full((steps,), float(lr), **like)}
        elif learn_lr == "per-parameter":
            tensors = {n: torch.full_like(params[n], float(lr)) for n in names}
        else:
            raise ValueError(f"--learn-lr must be one of {', '.join(LEARN_LR)}, got {learn_lr!r}")
        tensors = {k: t.requires_grad_() for k, t in tensors.items()}
        return cls(learn_lr, float(lr), adapt, tensors, make_inner_optimizer(optimizer, lr))

    @property
    def learned(self) -> bool:
        """True when the step size is a meta-parameter."""
        return bool(self.tensors)

    @property
    def default(self) -> bool:
        """True for plain MAML: a fixed gradient step, every parameter adapts."""
        return not self.learned and self.adapt is None and self.optimizer is None

    def adapt_kwargs(self) -> dict[str, Any]:
        """``tmg.adapt``'s ``lr=`` (or ``optimizer=``) and ``adapt=`` for this inner loop."""
        if self.optimizer is not None:
            return {"lr": None, "optimizer": self.optimizer, "adapt": self.adapt}
        return {"lr": self.lr(), "adapt": self.adapt}

    def parameters(self) -> list[Tensor]:
        """The learned rates, for the outer optimizer (empty when the lr is fixed)."""
        return list(self.tensors.values())

    def lr(self, *, detach: bool = False) -> Lr:
        """The step size as ``tmg.adapt`` and :func:`~recipes.common.evaluation.adaptation_curve`
        take it: the float, the 0-dim or ``(K,)`` tensor, or the per-parameter dict."""
        if not self.learned:
            return self.base_lr
        tensors = {k: t.detach() if detach else t for k, t in self.tensors.items()}
        return tensors["lr"] if self.mode in ("scalar", "per-step") else tensors

    def state_dict(self) -> dict[str, Tensor]:
        """The learned rates (copies), for a checkpoint."""
        return {k: t.detach().clone() for k, t in self.tensors.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`state_dict` in place (the optimizer keeps pointing at the tensors).

        Raises:
            ValueError: the names or shapes differ from this run's rates.
        """
        if set(state) != set(self.tensors):
            raise ValueError(
                f"learned lr in the checkpoint has entries {sorted(state)}, this run "
                f"{sorted(self.tensors)}"
            )
        with torch.no_grad():
            for k, t in self.tensors.items():
                if state[k].shape != t.shape:
                    raise ValueError(
                        f"learned lr {k!r}: checkpoint shape {tuple(state[k].shape)}, this run "
                        f"{tuple(t.shape)}"
                    )
                t.copy_(state[k])

    def stats(self) -> dict[str, float]:
        """Mean, min and max of every learned rate (``{}`` when the lr is fixed)."""
        if not self.learned:
            return {}
        flat = torch.cat([t.detach().reshape(-1) for t in self.tensors.values()])
        return {
            "inner/lr_mean": float(flat.mean()),
            "inner/lr_min": float(flat.min()),
            "inner/lr_max": float(flat.max()),
        }

    def describe(self) -> dict[str, Any]:
        """A JSON summary: mode, adapted names, the rates (per-parameter: mean per tensor)."""
        out: dict[str, Any] = {"learn_lr": self.mode, "adapt": self.adapt or "all"}
        if self.mode in ("scalar", "per-step"):
            out["lr"] = self.tensors["lr"].detach().tolist()
        elif self.learned:
            out["lr_mean_by_param"] = {k: float(t.detach().mean()) for k, t in self.tensors.items()}
        return {**out, **self.stats()}

"""Small config dataclasses, validated at construction.

Each component owns one (STYLE.md 7). A bad value raises ``ValueError`` naming the value, the valid range
and the fix. Configs round-trip through plain dicts (``to_dict`` / ``from_dict``) so they can live inside a
transformers ``config.json`` and in a run's resolved config.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="ConfigBase")


def check_finite(config: Any) -> None:
    """ValueError naming the key, the value and the fix if a float field of the dataclass ``config`` (or a
    float inside a tuple / list field) is NaN or infinite."""
    key = type(config).section_key()
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        items = value if isinstance(value, tuple | list) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            default = field.default if field.default is not dataclasses.MISSING else None
            hint = f" (default {default!r})" if isinstance(default, int | float | tuple) else ""
            hint = " or none (the default)" if field.default is None else hint
            raise ValueError(
                f"{key}.{field.name}={value!r} is not a finite number; set a finite value{hint}."
            )


class ConfigBase:
    """Mixin: dict round-trip with a clear error on unknown keys, and every float checked finite.

    Every dataclass deriving from it checks its float fields first at construction (``check_finite``),
    before its own ``__post_init__`` (``__init_subclass__`` wraps that, so a config class needs no call):
    NaN passes every range check written as ``x < 0`` (MoE-LLaVA's ``beta=nan`` trained the baseline under
    the name stgc-betanan) and an infinity every ``x > 0``, so each range check alone would let them in.
    Messages name keys as ``<section>.<field>``; the section is ``config_key`` or the class name without
    "Config", lower-cased (``TrainingConfig`` -> ``training``).
    """

    config_key: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None or getattr(own, "_checks_finite", False):
            return  # none of its own: ConfigBase.__post_init__ (below) is inherited

        @functools.wraps(own)
        def __post_init__(self: Any, *args: Any, **kw: Any) -> None:
            check_finite(self)
            own(self, *args, **kw)

        __post_init__._checks_finite = True  # type: ignore[attr-defined]
        cls.__post_init__ = __post_init__  # type: ignore[attr-defined]

    def __post_init__(self) -> None:
        check_finite(self)

    @classmethod
    def section_key(cls) -> str:
        return cls.config_key or cls.__name__.removesuffix("Config").lower()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown key(s) {unknown}; valid keys are {sorted(names)}. "
                "Fix the spelling or remove them."
            )
        return cls(**data)  # type: ignore[call-arg]

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


# --------------------------------------------------------------------------------------------------------
# the parts of a MoE layer: a router and an expert bank, each chosen by name (docs/extending.md)


@dataclasses.dataclass(frozen=True)
class RouterConfig(ConfigBase):
    """Base of every router's settings; ``name`` selects the router class (``stgc.moe.routers.ROUTERS``).
    A router may be wider than the bank (``width``): columns past the bank's experts are null experts."""

    name: str = "softmax_topk"

    def width(self, num_experts: int) -> int:
        """The router's output width R for a bank of ``num_experts`` experts."""
        return num_experts

    def check(self, moe: MoEConfig) -> None:
        """Refuse settings that do not fit the MoE layer ``moe`` (one clear ValueError); called by
        ``MoEConfig`` once its own fields are valid."""


@dataclasses.dataclass(frozen=True)
class ExpertsConfig(ConfigBase):
    """Base of every expert bank's settings; ``name`` selects the bank class
    (``stgc.moe.experts.EXPERT_BANKS``)."""

    name: str = "ffn"


ROUTER_CONFIGS: dict[str, type[RouterConfig]] = {}
EXPERTS_CONFIGS: dict[str, type[ExpertsConfig]] = {}


def register_router_config(cls: type[RouterConfig]) -> type[RouterConfig]:
    """Class decorator: make a router's settings selectable as ``model.moe.router.name=<name>``."""
    return _register(ROUTER_CONFIGS, cls, "router")


def register_experts_config(cls: type[ExpertsConfig]) -> type[ExpertsConfig]:
    """Class decorator: make an expert bank's settings selectable as ``model.moe.experts.name=<name>``."""
    return _register(EXPERTS_CONFIGS, cls, "expert bank")


def _register(registry: dict[str, type], cls: type, what: str) -> type:
    name = cls().name
    if name in registry:
        raise ValueError(f"{what} {name!r} is registered twice")
    registry[name] = cls
    return cls


def section_from_dict(registry: dict[str, type[T]], data: Any, key: str, default: str) -> T:
    """A registry section (``model.moe.router``, ``model.moe.experts``) from its dict form (or the object
    itself); an unknown name raises with the valid names."""
    if isinstance(data, ConfigBase):
        return data  # type: ignore[return-value]
    data = dict(data or {"name": default})
    name = data.setdefault("name", default)
    if name not in registry:
        raise ValueError(f"{key}.name={name!r} is unknown; valid choices are {sorted(registry)}.")
    return registry[name].from_dict(data)


@register_router_config
@dataclasses.dataclass(frozen=True)
class SoftmaxTopKConfig(RouterConfig):
    """MoE-LLaVA's router (DeepSpeed's top-k gate): logits = W x (+ b with ``bias``), softmax, top-k,
    combine weights renormalised over the chosen experts. Its capacity and sampling options are the MoE
    layer's (``MoEConfig``), since they apply to any token-choice router."""

    name: str = "softmax_topk"
    bias: bool = False


@register_experts_config
@dataclasses.dataclass(frozen=True)
class FFNExpertsConfig(ExpertsConfig):
    """E full copies of the dense FFN (sparse upcycling; MoE-LLaVA's experts)."""

    name: str = "ffn"


# --------------------------------------------------------------------------------------------------------
# peer methods II (issue 15): LLaVA-MoLE's router and LoRA expert bank


@register_router_config
@dataclasses.dataclass(frozen=True)
class MoLERouterConfig(RouterConfig):
    """LLaVA-MoLE's router (``stgc.moe.routers.mole``): logits = W x + b (a bias, as the released
    ``nn.Linear`` router has), p = softmax, top-k of p, and combine weights the probabilities themselves
    (not renormalised over the chosen experts). With top_k = 1 the chosen LoRA delta is scaled by its
    probability (Switch-style), so the router learns from the LM loss; with top_k = num_experts it is the
    released code's dense soft mixture sum_i p_i dW_i x."""

    name: str = "mole"
    bias: bool = True


@register_experts_config
@dataclasses.dataclass(frozen=True)
class LoRAExpertsConfig(ExpertsConfig):
    """LLaVA-MoLE's experts (``stgc.moe.experts.lora``): the dense FFN frozen, each expert a LoRA delta
    (rank ``rank``, scale ``alpha / rank``, ``dropout`` on the delta's input) on every projection of it
    (gate / up / down, or fc1 / fc2). Defaults: the released checkpoint's name (r16, a32, 3 experts) and
    the released code's dropout 0.05."""

    name: str = "lora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(
                f"moe.experts.rank={self.rank!r} is invalid; use a positive integer no larger than the "
                "model's hidden and FFN sizes (LLaVA-MoLE: 16)."
            )
        if not self.alpha > 0:
            raise ValueError(f"moe.experts.alpha={self.alpha} is invalid; use alpha > 0 (LLaVA-MoLE: 32).")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"moe.experts.dropout={self.dropout} is invalid; use 0 <= dropout < 1.")


# --------------------------------------------------------------------------------------------------------

IMPLEMENTATIONS = ("auto", "eager")


@dataclasses.dataclass(frozen=True)
class MoEConfig(ConfigBase):
    """Settings of every MoE layer of a model (docs/method.md, "The base model").

    num_experts: E experts per MoE layer (each upcycled from the dense FFN).
    top_k: K experts per token; combine weights are renormalised over the K chosen (DeepSpeed's top-2 gate).
    layers: decoder layer indices whose MLP is a MoE block; ``None`` means every ``layer_every``-th layer
        from 0 (MoE-LLaVA: every other layer, 0, 2, 4, ...; LLaVA-MoLE: every layer, ``layer_every=1``).
    aux_loss_coef: alpha, the coefficient of the ``load_balance`` objective (MoE-LLaVA: 0.01).
    capacity_factor: ``None`` (default) routes every token; a number reproduces DeepSpeed's capacity
        ceil(cf * K * T / E) (at least ``min_capacity``) with token dropping, top-1 assignments first, in
        training. eval_capacity_factor: the factor at evaluation (MoE-LLaVA: 1.5 in training, 2.0 at
        evaluation); ``None`` uses ``capacity_factor`` there too.
    second_expert_sampling: DeepSpeed's Gumbel-noise choice of the 2nd expert (also at evaluation, which
        makes MoE-LLaVA's scores non-deterministic). Off by default; training only unless
        ``sample_at_eval``.
    route_padding: MoE-LLaVA routes padding tokens and counts them in capacity and in L_aux. Off by default:
        padding is masked out of routing statistics and losses.
    router / experts: which router and expert bank every MoE layer has, with their own settings (saved in
        the checkpoint, so that evaluation and analysis route exactly as training did).
    implementation: ``auto`` runs the fused fast path where one is registered for the (router, bank) pair
        (``stgc.moe.fused``), else the eager one; ``eager`` always runs the readable eager parts.
    """

    num_experts: int = 4
    top_k: int = 2
    layers: tuple[int, ...] | None = None
    layer_every: int = 2
    aux_loss_coef: float = 0.01
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    min_capacity: int = 4
    second_expert_sampling: bool = False
    sample_at_eval: bool = False
    route_padding: bool = False
    router: RouterConfig = dataclasses.field(default_factory=SoftmaxTopKConfig)
    experts: ExpertsConfig = dataclasses.field(default_factory=FFNExpertsConfig)
    implementation: str = "auto"

    def __post_init__(self) -> None:
        if self.layers is not None and not isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        router = section_from_dict(ROUTER_CONFIGS, self.router, "moe.router", "softmax_topk")
        experts = section_from_dict(EXPERTS_CONFIGS, self.experts, "moe.experts", "ffn")
        object.__setattr__(self, "router", router)
        object.__setattr__(self, "experts", experts)
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"moe.num_experts={self.num_experts!r} is invalid; use an integer >= 1.")
        width = router.width(self.num_experts)
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= width:
            raise ValueError(
                f"moe.top_k={self.top_k!r} is invalid for a router of width {width} (num_experts="
                f"{self.num_experts}, router {router.name!r}); use 1 <= top_k <= {width}."
            )
        if self.aux_loss_coef < 0:
            raise ValueError(f"moe.aux_loss_coef={self.aux_loss_coef} is negative; use a value >= 0.")
        for key in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(
                    f"moe.{key}={value} is invalid; use a positive number or None (no token dropping)."
                )
        if self.eval_capacity_factor is not None and self.capacity_factor is None:
            raise ValueError(
                f"moe.eval_capacity_factor={self.eval_capacity_factor} without a training capacity_factor; "
                "set moe.capacity_factor too (MoE-LLaVA: 1.5 and 2.0), or neither (no token dropping)."
            )
        if self.min_capacity < 0:
            raise ValueError(f"moe.min_capacity={self.min_capacity} is negative; use a value >= 0.")
        if self.second_expert_sampling and self.top_k != 2:
            raise ValueError(
                f"moe.second_expert_sampling needs top_k=2 (DeepSpeed's top-2 gate); got top_k={self.top_k}."
            )
        if not isinstance(self.layer_every, int) or self.layer_every < 1:
            raise ValueError(
                f"moe.layer_every={self.layer_every!r} is invalid; use an integer >= 1 (2: every other "
                "layer)."
            )
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"moe.layers={self.layers} has duplicates; list each layer index once.")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"moe.implementation={self.implementation!r} is not valid; choose one of {IMPLEMENTATIONS}."
            )
        router.check(self)

    def capacity(self, training: bool) -> float | None:
        """The capacity factor in force (training or evaluation)."""
        if not training and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        return self.capacity_factor

    def resolve_layers(self, num_hidden_layers: int) -> tuple[int, ...]:
        """The MoE layer indices for a model with ``num_hidden_layers`` decoder layers (validated)."""
        every = self.layer_every
        layers = self.layers if self.layers is not None else tuple(range(0, num_hidden_layers, every))
        bad = [i for i in layers if not 0 <= i < num_hidden_layers]
        if bad:
            raise ValueError(
                f"moe.layers contains {bad}, out of range for a model with {num_hidden_layers} decoder "
                f"layers; valid indices are 0..{num_hidden_layers - 1}."
            )
        return tuple(sorted(layers))


# --------------------------------------------------------------------------------------------------------
# peer routing methods I (docs/peers_routing.md): the routers of CompeteSMoE, AdaMoE, MoMa and MoCLE-style
# instruction clusters. Their objectives' settings are in ``stgc.objectives.config``.


@register_router_config
@dataclasses.dataclass(frozen=True)
class CompeteSMoERouterConfig(SoftmaxTopKConfig):
    """CompeteSMoE (v2)'s router: MoE-LLaVA's softmax top-k (``softmax_topk``'s settings) on ordinary steps
    and always at evaluation; on a competition step (``RoutingContext.dense_layers``, scheduled by the
    ``competesmoe`` objective) every expert runs and the winners are the top-k of the experts' neural
    responses mean_d softplus(o_i)."""

    name: str = "competesmoe"


@register_router_config
@dataclasses.dataclass(frozen=True)
class AdaMoERouterConfig(RouterConfig):
    """AdaMoE's router: ``null_experts`` zero-output, zero-cost experts beside the bank's, so that the
    router's top-k (``moe.top_k``, raised above the baseline's: E=4, k=2 -> m=4, k=3) picks 0..k true
    experts per token. Null columns are the router's last ``null_experts`` columns (>= E)."""

    name: str = "adamoe"
    null_experts: int = 4

    def width(self, num_experts: int) -> int:
        return num_experts + self.null_experts

    def check(self, moe: MoEConfig) -> None:
        if not isinstance(self.null_experts, int) or self.null_experts < 1:
            raise ValueError(
                f"moe.router.null_experts={self.null_experts!r} is invalid for AdaMoE; use an integer >= 1 "
                "(AdaMoE's default for 4 experts: 4), or router softmax_topk for no null experts."
            )
        if moe.top_k < 2:
            raise ValueError(
                f"moe.top_k={moe.top_k} is too small for AdaMoE's null experts: with top_k=1 a chosen true "
                "expert always gets combine weight 1 (renormalised over the true experts chosen), so the "
                "language-model loss never reaches the router and it cannot learn when to pick a true "
                "expert; use top_k >= 2 (AdaMoE: 3 for 4 experts + 4 null experts)."
            )


MOMA_IMAGE_ROUTING = ("token_choice", "expert_choice")


@register_router_config
@dataclasses.dataclass(frozen=True)
class MoMaRouterConfig(RouterConfig):
    """MoMa's modality groups: experts [0, image_experts) take image tokens only, the next
    ``text_experts`` every other token; a token routes inside its own group (top ``moe.top_k`` of the
    group's softmax). image_routing: ``token_choice`` (default; LTDR's variant) or ``expert_choice``
    (MoMa's: each image expert picks its top tokens of each sample's image block by sigmoid score, at most
    ``moe.top_k`` experts per token)."""

    name: str = "moma"
    image_experts: int = 2
    text_experts: int = 2
    image_routing: str = "token_choice"

    def check(self, moe: MoEConfig) -> None:
        groups = (self.image_experts, self.text_experts)
        if not all(isinstance(g, int) and g >= 1 for g in groups) or sum(groups) != moe.num_experts:
            raise ValueError(
                f"moe.router.image_experts={self.image_experts!r} + text_experts={self.text_experts!r} must "
                f"add up to moe.num_experts={moe.num_experts}, each >= 1; e.g. image_experts=2, "
                "text_experts=2 for 4 experts."
            )
        if moe.top_k > min(groups):
            raise ValueError(
                f"moe.top_k={moe.top_k} is larger than a MoMa group (image {self.image_experts}, text "
                f"{self.text_experts} experts): a token routes inside its group only; use top_k <= "
                f"{min(groups)}."
            )
        if self.image_routing not in MOMA_IMAGE_ROUTING:
            raise ValueError(
                f"moe.router.image_routing={self.image_routing!r} is not valid; choose one of "
                f"{MOMA_IMAGE_ROUTING}."
            )
        if moe.route_padding or moe.second_expert_sampling:
            raise ValueError(
                "moe.route_padding / moe.second_expert_sampling (MoE-LLaVA's DeepSpeed behaviours) are not "
                "defined for MoMa's modality groups; turn them off."
            )


MOCLE_GATES = ("token", "sample_top1")


@register_router_config
@dataclasses.dataclass(frozen=True)
class MoCLERouterConfig(RouterConfig):
    """MoCLE-style instruction clusters: each sample's instruction cluster (K-means over sentence
    embeddings of the training instructions, ``stgc.clusters``) indexes a learned embedding T[c]
    (num_clusters x cluster_dim) that enters the router.

    gate: ``token`` (default; LTDR's recipe): logits_t = W x_t + V T[c], softmax top-k per token.
        ``sample_top1`` (MoCLE's): one gate per sample from T[c] alone, softmax(V T[c] / temperature
        + N(0, noise_std^2) in training), top ``moe.top_k`` (MoCLE: 1) for every token of the sample.
    num_clusters: K-means k (MoCLE ships 16 and 64; LTDR 128). embedding_model: the sentence-transformers
    model of the instructions (a name or folder; ``None``: ``stgc.embeddings``' default, the bundled
    all-MiniLM-L6-v2). cluster_seed: K-means' random_state.
    """

    uses_instruction_clusters: ClassVar[bool] = True  # (stgc.clusters: the collator and adapter add ids)

    name: str = "mocle"
    num_clusters: int = 64
    cluster_dim: int = 384
    gate: str = "token"
    temperature: float = 0.05
    noise_std: float = 0.1
    embedding_model: str | None = None
    cluster_seed: int = 0

    def check(self, moe: MoEConfig) -> None:
        if not isinstance(self.num_clusters, int) or self.num_clusters < 2:
            raise ValueError(
                f"moe.router.num_clusters={self.num_clusters!r} is invalid; use an integer >= 2 (MoCLE: 16 "
                "or 64)."
            )
        if not isinstance(self.cluster_dim, int) or self.cluster_dim < 1:
            raise ValueError(f"moe.router.cluster_dim={self.cluster_dim!r} is invalid; use an integer >= 1.")
        if self.gate not in MOCLE_GATES:
            raise ValueError(f"moe.router.gate={self.gate!r} is not valid; choose one of {MOCLE_GATES}.")
        if not self.temperature > 0 or not self.noise_std >= 0:
            raise ValueError(
                f"moe.router.temperature={self.temperature} / noise_std={self.noise_std}: use "
                "temperature > 0 and noise_std >= 0 (MoCLE: 0.05 and 0.1)."
            )

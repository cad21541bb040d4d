"""What a run optimises besides the LM loss, as configuration (torch-free: recipes, overrides and saved
configs read it without building anything).

A run's ``method`` is a label plus a list of objectives, e.g. ``[load_balance]`` (MoE-LLaVA's baseline),
``[load_balance, stgc]``, ``[load_balance, z_loss]``. Each objective's settings are a small dataclass
registered by name (``register_objective_config``); its implementation lives in ``stgc.objectives.<name>``
(docs/extending.md). ``METHODS`` holds the named presets (``method.name=stgc``): their objectives and any
change to the MoE layers they need (a peer's router).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from stgc.config import ConfigBase, section_from_dict

# --------------------------------------------------------------------------------------------------------
# objective settings


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig(ConfigBase):
    """Base of every objective's settings; ``name`` selects the objective class."""

    name: str = ""


OBJECTIVE_CONFIGS: dict[str, type[ObjectiveConfig]] = {}


def register_objective_config(cls: type[ObjectiveConfig]) -> type[ObjectiveConfig]:
    """Class decorator: make an objective selectable by name (``method.objectives=...``)."""
    name = cls().name
    if not name or name in OBJECTIVE_CONFIGS:
        raise ValueError(f"objective {name!r} is unnamed or registered twice")
    OBJECTIVE_CONFIGS[name] = cls
    return cls


def objective_from_dict(data: Any) -> ObjectiveConfig:
    """An objective's settings from a name, a dict with a ``name`` or the object itself."""
    if isinstance(data, str):
        data = {"name": data}
    if isinstance(data, dict) and not data.get("name"):
        raise ValueError(f"objective {data!r} has no name; valid objectives are {sorted(OBJECTIVE_CONFIGS)}.")
    return section_from_dict(OBJECTIVE_CONFIGS, data, "method.objectives", "")


@register_objective_config
@dataclasses.dataclass(frozen=True)
class LoadBalanceConfig(ObjectiveConfig):
    """MoE-LLaVA's load-balancing loss, alpha * sum_layers E * sum_e f_e P_e (docs/method.md). Its
    coefficient alpha is ``model.moe.aux_loss_coef`` (saved with the model, as MoE-LLaVA's recipe does)."""

    name: str = "load_balance"


@register_objective_config
@dataclasses.dataclass(frozen=True)
class ZLossConfig(ObjectiveConfig):
    """ST-MoE's router z-loss, coef * mean over real tokens of logsumexp(logits)^2 per layer, summed over
    layers (Zoph et al. 2022; CompeteSMoE's recipe uses coef 0.001)."""

    name: str = "z_loss"
    coef: float = 0.001

    def __post_init__(self) -> None:
        if not self.coef >= 0:
            raise ValueError(f"z_loss.coef={self.coef} is invalid; use a value >= 0 (CompeteSMoE: 0.001).")


STGC_SCORES = ("mean", "concat", "g1", "g2")
STGC_LOSS_FORMS = ("neg_logit_ce", "prob", "min_score")
STGC_MODES = ("fused", "two_pass", "reference")


@register_objective_config
@dataclasses.dataclass(frozen=True)
class STGCConfig(ObjectiveConfig):
    """STGC's conflict elimination loss (docs/method.md).
    beta: its weight (the paper's value is unknown; 0.01 is ours: sweep it).
    tau: a (token, expert) pair conflicts when its score < tau (default 0).
    score: mean | concat | g1 | g2. loss: neg_logit_ce | prob | min_score.
    layers: decoder-layer indices of the MoE layers L_cel applies to (None: every MoE layer).
    start_step: first optimizer step with L_cel. mode: fused | two_pass | reference.
    allreduce_mean: expert mean gradients over data-parallel ranks instead of per micro-batch.
    """

    name: str = "stgc"
    beta: float = 0.01
    tau: float = 0.0
    score: str = "mean"
    loss: str = "neg_logit_ce"
    layers: tuple[int, ...] | None = None
    start_step: int = 0
    mode: str = "fused"
    allreduce_mean: bool = False

    def __post_init__(self) -> None:
        if self.layers is not None and not isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"stgc.tau={self.tau} is outside [-1, 1] (it thresholds a cosine); use -1..1.")
        if not self.beta >= 0:
            raise ValueError(f"stgc.beta={self.beta} is invalid; use beta >= 0 (0 turns the loss off).")
        if self.score not in STGC_SCORES:
            raise ValueError(f"stgc.score={self.score!r} is not valid; choose one of {STGC_SCORES}.")
        if self.loss not in STGC_LOSS_FORMS:
            raise ValueError(f"stgc.loss={self.loss!r} is not valid; choose one of {STGC_LOSS_FORMS}.")
        if self.mode not in STGC_MODES:
            raise ValueError(f"stgc.mode={self.mode!r} is not valid; choose one of {STGC_MODES}.")
        if self.start_step < 0:
            raise ValueError(f"stgc.start_step={self.start_step} is negative; use a step >= 0.")


# --------------------------------------------------------------------------------------------------------
# methods: a label and a list of objectives


@dataclasses.dataclass(frozen=True)
class MethodPreset:
    """A named method: its objectives (names, in order) and the changes it makes to the run, applied by
    ``stgc.recipes.with_method``: ``moe`` (MoEConfig fields, e.g. a peer's router or bank) and ``training``
    (TrainingConfig fields, e.g. which parameter groups train). Every preset gets recipes
    ``<base>_<name>`` and ``<base>_<name>_stgc`` for each base recipe (``stgc.recipes``).
    ``post_training``: a stage on a trained MoE checkpoint (RoMA): ``model.init`` becomes
    ``recipe:<base recipe>``, that recipe's final checkpoint (trained first if missing)."""

    objectives: tuple[str, ...]
    moe: dict[str, Any] = dataclasses.field(default_factory=dict)
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    doc: str = ""
    post_training: bool = False


METHODS: dict[str, MethodPreset] = {
    "baseline": MethodPreset(("load_balance",), doc="MoE-LLaVA: L_lm + alpha L_aux"),
    "stgc": MethodPreset(("load_balance", "stgc"), doc="MoE-LLaVA + STGC's conflict elimination loss"),
    "z_loss": MethodPreset(("load_balance", "z_loss"), doc="MoE-LLaVA + ST-MoE's router z-loss"),
}


def register_method(name: str, preset: MethodPreset) -> None:
    if name in METHODS:
        raise ValueError(f"method {name!r} is registered twice")
    METHODS[name] = preset


def _default_objectives() -> tuple[ObjectiveConfig, ...]:
    return (LoadBalanceConfig(),)


@dataclasses.dataclass(frozen=True)
class MethodConfig(ConfigBase):
    """A run's routing method: ``name`` (the label of its run folder and table rows; a preset of
    ``METHODS`` or any label) and its ``objectives``, each with its settings.

    The dict form is ``{"name": ..., "objectives": [{"name": ..., ...}, ...]}``. The layout written before
    objectives existed (``{"name": "stgc", "beta": ..., ...}``) still reads: the preset's objectives with
    the parameters given to the objective that has them."""

    name: str = "baseline"
    objectives: tuple[ObjectiveConfig, ...] = dataclasses.field(default_factory=_default_objectives)

    def __post_init__(self) -> None:
        objs = tuple(objective_from_dict(o) for o in self.objectives)
        object.__setattr__(self, "objectives", objs)
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"method.name={self.name!r} is invalid; use a plain label such as 'stgc'.")
        names = [o.name for o in objs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"method.objectives lists {dupes} more than once; list each objective once.")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> MethodConfig:
        data = dict(data or {"name": "baseline"})
        if "objectives" in data:
            return super().from_dict(data)
        name = data.pop("name", "baseline")
        if name not in METHODS:
            raise ValueError(f"unknown routing method {name!r}; valid methods are {sorted(METHODS)}.")
        return method_preset(name, **data)

    def objective(self, name: str) -> ObjectiveConfig | None:
        return next((o for o in self.objectives if o.name == name), None)

    def tag(self) -> str:
        """The label plus every objective parameter that differs from its default (``stgc-beta0.05``)."""
        diff = []
        for o in self.objectives:
            defaults = type(o)().to_dict()
            diff += [f"{k}{_fmt(v)}" for k, v in o.to_dict().items() if k != "name" and v != defaults[k]]
        return "-".join([self.name, *diff])


def method_preset(name: str, **params: Any) -> MethodConfig:
    """The preset ``name`` (``METHODS``), each parameter given to the one objective that has it."""
    if name not in METHODS:
        raise ValueError(f"unknown routing method {name!r}; valid methods are {sorted(METHODS)}.")
    configs = [OBJECTIVE_CONFIGS[o]() for o in METHODS[name].objectives]
    for key, value in params.items():
        owners = [i for i, c in enumerate(configs) if key in {f.name for f in dataclasses.fields(c)}]
        if len(owners) != 1 or key == "name":
            valid = sorted({f.name for c in configs for f in dataclasses.fields(c)} - {"name"})
            raise ValueError(
                f"method {name!r}: parameter {key!r} belongs to {len(owners)} of its objectives "
                f"{[c.name for c in configs]}; valid parameters are {valid}."
            )
        i = owners[0]
        configs[i] = type(configs[i]).from_dict({**configs[i].to_dict(), key: value})
    return MethodConfig(name=name, objectives=tuple(configs))


def with_objective(
    method: MethodConfig, objective: ObjectiveConfig, label: Callable[[str], str]
) -> MethodConfig:
    """``method`` with ``objective`` added (or replacing the one of the same name), relabelled."""
    rest = tuple(o for o in method.objectives if o.name != objective.name)
    return MethodConfig(name=label(method.name), objectives=(*rest, objective))


def objective_params(routing_method: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    """The settings of objective ``name`` in a saved method dict (either layout), or ``None``."""
    if not routing_method:
        return None
    try:
        method = MethodConfig.from_dict(routing_method)
    except ValueError:
        return None
    found = method.objective(name)
    return None if found is None else found.to_dict()


def _fmt(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "_".join(str(v) for v in value)
    return str(value)


# --------------------------------------------------------------------------------------------------------
# peer methods II (issue 15): LLaVA-MoLE, RoMA, AGM (docs/peers_training.md). Their settings, then their
# presets; the router and expert bank settings of LLaVA-MoLE are in stgc.config.


@register_objective_config
@dataclasses.dataclass(frozen=True)
class MoLEBalanceConfig(ObjectiveConfig):
    """LLaVA-MoLE's balance loss, coef * mean over samples of sum_e mean(p_e) * mean(1[argmax = e]), both
    means pooled over the sample's real tokens in every MoE layer (no x E factor; docs/baselines.md).
    coef 0.01 [ours: the paper's value is not public; MoE-LLaVA's alpha]."""

    name: str = "mole_balance"
    coef: float = 0.01

    def __post_init__(self) -> None:
        if not self.coef >= 0:
            raise ValueError(f"mole_balance.coef={self.coef} is invalid; use a value >= 0 (ours: 0.01).")


@register_objective_config
@dataclasses.dataclass(frozen=True)
class RoMAConfig(ObjectiveConfig):
    """RoMA's routing manifold regulariser, lam * sum_j W_ij ||r_i - r_j||^2 (stgc.objectives.roma).
    lam: its weight [ours: 1.0; the paper leaves it open]. k: neighbours per sample (paper: 3).
    last_layers: r concatenates the routing weights of the last this-many MoE layers (paper: 5; all of
    them when the model has fewer). embedding_model: a sentence-transformers name or folder (None: the
    bundled all-MiniLM-L6-v2, ``stgc.embeddings``). judge_batch_size / max_new_tokens: the greedy
    generation that finds the correctly answered training samples at the start of the stage.
    """

    name: str = "roma"
    lam: float = 1.0
    k: int = 3
    last_layers: int = 5
    embedding_model: str | None = None
    judge_batch_size: int = 32
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if not self.lam >= 0:
            raise ValueError(f"roma.lam={self.lam} is invalid; use a value >= 0 (ours: 1.0).")
        for key in ("k", "last_layers", "judge_batch_size", "max_new_tokens"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"roma.{key}={value!r} is invalid; use an integer >= 1.")


AGM_MODES = ("lite", "faithful")


@register_objective_config
@dataclasses.dataclass(frozen=True)
class AGMConfig(ObjectiveConfig):
    """AGM's gradient modulation of two players, image and text tokens (stgc.objectives.agm).
    alpha: kappa_m = exp(alpha * min(rbar_m - r_m, cap)) (AGM: alpha 1.0, cap 10).
    mode: "lite" [ours, default]: kappa from no-grad mono-modal forwards, applied as a scale on the
    gradients of image vs text hidden states entering the MoE layers; "faithful": the two mono-modal
    forwards keep their graphs and kappa scales each player's Shapley logits (AGM's logit-level hooks).
    """

    name: str = "agm"
    alpha: float = 1.0
    cap: float = 10.0
    mode: str = "lite"

    def __post_init__(self) -> None:
        if not self.alpha >= 0:
            raise ValueError(f"agm.alpha={self.alpha} is invalid; use alpha >= 0 (AGM: 1.0; 0: off).")
        if not self.cap > 0:
            raise ValueError(f"agm.cap={self.cap} is invalid; use a value > 0 (AGM: 10).")
        if self.mode not in AGM_MODES:
            raise ValueError(f"agm.mode={self.mode!r} is not valid; choose one of {AGM_MODES}.")


register_method(
    "mole",
    MethodPreset(
        ("mole_balance",),
        moe={
            "num_experts": 3,
            "top_k": 1,
            "layer_every": 1,
            # LLaVA-MoLE drops no token (a token over capacity would silently lose its expert)
            "capacity_factor": None,
            "eval_capacity_factor": None,
            "router": {"name": "mole"},
            "experts": {"name": "lora"},
        },
        training={"trainable": "experts,router"},
        doc="LLaVA-MoLE: frozen dense FFN, 3 LoRA experts (r16, a32) per layer, top-1 scaled by p, "
        "per-sample balance",
    ),
)
register_method(
    "roma",
    MethodPreset(
        ("roma",),
        training={"trainable": "router"},
        doc="RoMA: router-only post-training of a MoE checkpoint, L_lm + lambda * routing manifold alignment",
        post_training=True,
    ),
)
register_method(
    "agm",
    MethodPreset(
        ("load_balance", "agm"),
        doc="MoE-LLaVA + AGM's Shapley-based gradient modulation of image vs text tokens (AGM-lite)",
    ),
)


# --------------------------------------------------------------------------------------------------------
# peer routing methods I (docs/peers_routing.md): CompeteSMoE, AdaMoE, MoMa, MoCLE-style clusters. Their
# routers' settings are in ``stgc.config``; each preset sets its router and lists its objectives.


@register_objective_config
@dataclasses.dataclass(frozen=True)
class CompeteSMoEConfig(ObjectiveConfig):
    """CompeteSMoE (v2)'s competition: its schedule and its losses (docs/peers_routing.md).

    warmup: share of the steps that are router-only at the start (5%). rate: probability that a layer
    competes on a step after the warm-up (0.05). max_layers: at most this many layers compete in one step
    (3; a step over the cap moves to the nearest earlier step with room, else the nearest later one).
    distill_coef: router distillation MSE(p, sg softmax(s)) (0.01); hybrid / theta: plus theta *
    MSE(p[S^C], sg softmax(s)[S^C]) on the winners (off; 0.1). diversity_coef: mean cosine between the
    winners' outputs (0.01). The competition-side balance loss is the competing layer's record aux_loss,
    weighted by the ``load_balance`` objective's alpha (0.01, CompeteSMoE's bal_comp_loss_coef).
    """

    name: str = "competesmoe"
    warmup: float = 0.05
    rate: float = 0.05
    max_layers: int = 3
    distill_coef: float = 0.01
    hybrid: bool = False
    theta: float = 0.1
    diversity_coef: float = 0.01

    def __post_init__(self) -> None:
        if not 0 <= self.warmup < 1:
            raise ValueError(f"competesmoe.warmup={self.warmup} must be in [0, 1) (a share of the steps).")
        if not 0 <= self.rate <= 1:
            raise ValueError(f"competesmoe.rate={self.rate} must be in [0, 1] (a probability per layer).")
        if not isinstance(self.max_layers, int) or self.max_layers < 1:
            raise ValueError(f"competesmoe.max_layers={self.max_layers!r} must be an integer >= 1.")
        for key in ("distill_coef", "theta", "diversity_coef"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"competesmoe.{key}={getattr(self, key)} must be >= 0.")


@register_objective_config
@dataclasses.dataclass(frozen=True)
class AdaMoEConfig(ObjectiveConfig):
    """AdaMoE's diagnostics: true experts per token (histogram, by modality) and expert FLOPs per token.
    Its balance loss (null experts pooled) is the adamoe router's aux_loss, applied by ``load_balance``."""

    name: str = "adamoe"


@register_objective_config
@dataclasses.dataclass(frozen=True)
class MoMaConfig(ObjectiveConfig):
    """MoMa's diagnostics: the loading of each expert within its modality group."""

    name: str = "moma"


@register_objective_config
@dataclasses.dataclass(frozen=True)
class MoCLEConfig(ObjectiveConfig):
    """MoCLE's diagnostics: normalised mutual information between the instruction cluster and the top-1
    expert, per MoE layer, over the real tokens of each micro-batch (no loss: LTDR's recipe has no balance
    loss)."""

    name: str = "mocle"


register_method(
    "competesmoe",
    MethodPreset(
        ("load_balance", "z_loss", "competesmoe"),
        moe={"router": {"name": "competesmoe"}},
        doc="CompeteSMoE v2: scheduled competition steps (neural-response winners), router distillation",
    ),
)
register_method(
    "adamoe",
    MethodPreset(
        ("load_balance", "adamoe"),
        moe={"router": {"name": "adamoe", "null_experts": 4}, "top_k": 3},
        doc="AdaMoE: 4 null experts, top-3, 0..3 true experts per token",
    ),
)
register_method(
    "moma",
    MethodPreset(
        ("load_balance", "moma"),
        moe={"router": {"name": "moma", "image_experts": 2, "text_experts": 2}, "top_k": 1},
        doc="MoMa-style modality groups: 2 image + 2 text experts, top-1 in the token's group",
    ),
)
register_method(
    "mocle",
    MethodPreset(
        ("mocle",),
        moe={"router": {"name": "mocle"}},
        doc="MoCLE-style instruction clusters: a learned cluster embedding in the token router, no balance",
    ),
)

"""CaspoConfig: every knob of the CASPO maths in one frozen dataclass, with presets.

Plain fields only (str, int, float, bool, None), so the trainer's config can embed it and
YAML can override it field by field. Invalid values raise ValueError naming the field
and the fix at construction time, long before anything is traced.
"""

import dataclasses

from caspo_jax.algo.advantages import TOKEN_SCOPES, VARIANTS
from caspo_jax.algo.aggregation import AGG_MODES
from caspo_jax.algo.kl import KL_KINDS

TEACHERS = ("rollout_policy", "frozen_sft", "original")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class CaspoConfig:
    """CASPO hyper-parameters; the defaults are the paper's (appendix B.1) where it gives them.

    Advantages (eqs. 4-5): lam, variant, token_scope, eps, scale_rewards,
    token_reward_clamp, nonneg_factor. Loss (eq. 6): beta, kl_kind, clip_low, clip_high,
    dual_clip, agg, norm_len. Step shape and optimiser: group_size (G),
    prompts_per_step (P), learning_rate.

    From appendix B.1: lam 0.3, beta 0.005, G 32, P 64, lr 2e-6. Not from the paper:
    eq. 6 is an unclipped ratio objective and names no KL estimator, so clip_low =
    clip_high = 0.2 and kl_kind k3 are verl's defaults (`clip_ratio`, `low_var_kl`), the
    framework the paper ran; agg token-mean is verl's default too, eps 1e-6 is ours.

    `teacher` says whose parameters score the constitution-conditioned log-probs of eq. 4
    (consumed by the trainer): "rollout_policy" = pi_old, the paper's dynamic reference
    (CASPO, and both CASPO-w.-SMC / -OMC under the starting-checkpoint reading of Fig. 6,
    which is the one the tables use); "frozen_sft" = the frozen SFT checkpoint and
    "original" = the pre-SFT model: the *teacher* reading of SMC / OMC.
    """

    lam: float = 0.3
    variant: str = "hybrid"
    token_scope: str = "group"
    eps: float = 1e-6
    scale_rewards: bool = True
    token_reward_clamp: float | None = None
    nonneg_factor: bool = False
    beta: float = 0.005
    kl_kind: str = "k3"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    agg: str = "token-mean"
    norm_len: int | None = None
    group_size: int = 32
    prompts_per_step: int = 64
    learning_rate: float = 2e-6
    teacher: str = "rollout_policy"

    def __post_init__(self):
        def bad(field, why):
            value = getattr(self, field)
            raise ValueError(f"CaspoConfig.{field}={value!r} is invalid: {why}")

        choices = {
            "variant": VARIANTS,
            "token_scope": TOKEN_SCOPES,
            "kl_kind": KL_KINDS,
            "agg": AGG_MODES,
            "teacher": TEACHERS,
        }
        numbers = ("lam", "eps", "beta", "clip_low", "clip_high", "learning_rate")
        optional_numbers = ("token_reward_clamp", "dual_clip")
        for field in numbers + optional_numbers:
            value = getattr(self, field)
            if value is None and field in optional_numbers:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                bad(field, f"must be a number, got {type(value).__name__} (write 2e-6 in YAML as 2.0e-6)")
        for field in ("scale_rewards", "nonneg_factor"):
            if not isinstance(getattr(self, field), bool):
                bad(field, "must be true or false")
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                bad(field, f"set it to one of {allowed}")
        if not self.lam >= 0:
            bad("lam", "the correction strength must be >= 0 (paper: 0.3; 0 = outcome only)")
        if not self.eps > 0:
            bad("eps", "must be > 0 (default 1e-6)")
        if self.token_reward_clamp is not None and not self.token_reward_clamp > 0:
            bad("token_reward_clamp", "must be > 0, or None for no clamp")
        if not self.beta >= 0:
            bad("beta", "the KL coefficient must be >= 0 (paper: 0.005; 0 drops the KL)")
        for field in ("clip_low", "clip_high"):
            if not getattr(self, field) > 0:
                bad(field, "the PPO clip range must be > 0 (default 0.2, verl's clip_ratio; eq. 6 has no clip)")
        if self.dual_clip is not None and not self.dual_clip > 1:
            bad("dual_clip", "must be > 1 (verl uses 3.0), or None to disable")
        if self.norm_len is not None and not (_is_int(self.norm_len) and self.norm_len > 0):
            bad("norm_len", "must be a positive int (e.g. the max response length 1024), or None for T")
        if not (_is_int(self.group_size) and self.group_size >= 2):
            bad("group_size", "group normalisation needs G >= 2 trajectories per prompt (paper: 32)")
        if not (_is_int(self.prompts_per_step) and self.prompts_per_step >= 1):
            bad("prompts_per_step", "must be a positive int (paper: 64)")
        if not self.learning_rate > 0:
            bad("learning_rate", "must be > 0 (paper: 2e-6)")

    def replace(self, **changes) -> "CaspoConfig":
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def advantage_kwargs(self) -> dict:
        """Keyword arguments for `caspo_advantages`."""
        return {
            "lam": self.lam,
            "variant": self.variant,
            "token_scope": self.token_scope,
            "eps": self.eps,
            "scale_rewards": self.scale_rewards,
            "token_reward_clamp": self.token_reward_clamp,
            "nonneg_factor": self.nonneg_factor,
        }

    def loss_kwargs(self) -> dict:
        """Keyword arguments for `caspo_loss`."""
        return {
            "beta": self.beta,
            "kl_kind": self.kl_kind,
            "clip_low": self.clip_low,
            "clip_high": self.clip_high,
            "dual_clip": self.dual_clip,
            "agg": self.agg,
            "norm_len": self.norm_len,
        }

    @classmethod
    def preset(cls, name: str) -> "CaspoConfig":
        """One of PRESETS by name."""
        if name not in PRESETS:
            raise ValueError(f"CaspoConfig.preset: unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return PRESETS[name]


PAPER = CaspoConfig()
PRESETS = {
    # Appendix B.1: lambda 0.3, beta 0.005, G = 32, 64 prompts per step, lr 2e-6 (k3 KL
    # and clip 0.2 are verl's defaults, not the paper's: see CaspoConfig).
    "paper": PAPER,
    # The ablations of Table 3: outcome-only (OutR) and token-only (TokR) advantages.
    # OutR is eq. 5 at lambda = 0 (table 10's lambda = 0 row), so its lam is 0 (unused).
    "paper-outr": PAPER.replace(variant="outcome", lam=0.0),
    # TokR: "normalization of log probability discrepancy across all tokens" (sec. 5.2).
    "paper-tokr": PAPER.replace(variant="token", token_scope="batch"),
    # The *teacher* reading of Fig. 6 (not the one the tables use): the token reward of
    # eq. 4 from the frozen SFT model (SMC) or from the original pre-SFT model (OMC, needs
    # model.teacher_path). The starting-checkpoint reading keeps the dynamic teacher
    # ("paper") and changes the initial policy: see caspo_jax/loop/presets.py.
    "paper-teacher-frozen-sft": PAPER.replace(teacher="frozen_sft"),
    "paper-teacher-original": PAPER.replace(teacher="original"),
}

# The named preset each `caspo sweep` variant runs, and the fields that make it that
# preset (the run's sizes, rates and KL stay the run's own).
VARIANT_PRESETS = {"hybrid": "paper", "outcome": "paper-outr", "token": "paper-tokr"}
VARIANT_FIELDS = ("variant", "token_scope", "lam")


def variant_config(base: CaspoConfig, variant: str, lam: float | None = None) -> CaspoConfig:
    """`base` with the VARIANT_FIELDS of VARIANT_PRESETS[variant]; `lam` (hybrid) on top.

    So a sweep's token-only cell is `paper-tokr` (batch scope) and its hybrid cells are
    `paper` (group scope) at their lambda, whatever scope the base config had.
    """
    if variant not in VARIANT_PRESETS:
        raise ValueError(f"variant {variant!r}: choose one of {sorted(VARIANT_PRESETS)}")
    named = PRESETS[VARIANT_PRESETS[variant]]
    changes = {field: getattr(named, field) for field in VARIANT_FIELDS}
    if lam is not None:
        changes["lam"] = float(lam)
    return base.replace(**changes)

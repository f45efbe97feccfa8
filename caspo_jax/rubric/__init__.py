"""The R/S/E rubric (Risk appraisal, Safety of consequences, Effectiveness): prompts and strict parsing."""

from caspo_jax.rubric.rse import (
    DIMENSIONS,
    RUBRIC_VERSION,
    RSEItem,
    RSEJudgement,
    RSEScore,
    RubricParseError,
    judge_messages,
    judge_rse,
    parse_scores,
    rse_to_reward,
)

__all__ = [
    "DIMENSIONS",
    "RUBRIC_VERSION",
    "RSEItem",
    "RSEJudgement",
    "RSEScore",
    "RubricParseError",
    "judge_messages",
    "judge_rse",
    "parse_scores",
    "rse_to_reward",
]

"""`caspo curate`: build latent-hazard benchmarks and training sets with the paper's pipeline.

Stages (each resumable, each its own module): synthesize -> filter -> dedup -> images ->
rewrite (-> export benchmark records) -> respond -> select (SFT targets, reward-model pairs and
MSE records from a pool balanced by model and length) and dpo (DPO-baseline pairs by score
disparity or length-balanced). All model calls go through
`caspo_jax.llm.ChatClient` (bounded concurrency, retries, cache, token accounting);
outputs are `caspo_jax.evals.store.ResultsStore` JSONL files (see `stage.py`).
"""

from caspo_jax.curate.balance import BalanceReport, balance_responses
from caspo_jax.curate.dedup import DedupResult, Embedder, dedup_records, normalize_text
from caspo_jax.curate.dpo_pairs import disparity_pairs, dpo_pairs, length_balanced_pairs
from caspo_jax.curate.filtering import FilterThresholds, filter_scenarios
from caspo_jax.curate.images import attach_images, load_image_map
from caspo_jax.curate.report import summarize, write_summary
from caspo_jax.curate.responses import respond
from caspo_jax.curate.rewrite import names_object, rewrite_queries
from caspo_jax.curate.selection import ScoredResponse, Selection, build_preferences, select, select_sft
from caspo_jax.curate.stage import Endpoint, kept_records, rejections
from caspo_jax.curate.synthesis import synthesize
from caspo_jax.curate.templates import PromptFileError, load_prompt_file

__all__ = [
    "BalanceReport", "DedupResult", "Embedder", "Endpoint", "FilterThresholds", "PromptFileError", "ScoredResponse",
    "Selection", "attach_images", "balance_responses", "build_preferences", "dedup_records", "disparity_pairs",
    "dpo_pairs", "filter_scenarios", "kept_records", "length_balanced_pairs", "load_image_map", "load_prompt_file",
    "names_object", "normalize_text", "rejections", "respond", "rewrite_queries", "select", "select_sft", "summarize",
    "synthesize", "write_summary",
]

"""The one module every notebook imports: `from helpers import ...` gives exactly the names below.
Its files form layers that import downward only: README's "The code" shows them, tests/test_layers.py
holds the table."""

from .backends import Endpoint, EndpointError, describe, load_pipeline
from .benchmark import notebook_bench
from .checking import chrf, diversity, edit_distance_cases, extract_code
from .data import (
    BLOG_SAMPLING,
    GPU_TYPES,
    KNOWN_MODELS,
    TASKS,
)
from .distribution import (
    generate_scored,
    next_token_distribution,
)
from .fastpath import fast_recipe
from .fitting import Fit
from .generation import generate, generate_batch, print_stream
from .hardware import dtype_name, measure_bandwidth, this_machine
from .loading import check_fits, model_path, pick_dtype, weight_bytes
from .moe import (
    NextLayerGuess,
    cost_experiment,
    draw_loads,
    experts_per_token,
    experts_read_per_step,
    prefetch_recall,
    route_softmax_topk_renorm,
    route_topk_then_softmax,
    trace_generation,
)
from .offload import OffloadMeter, placement
from .planning import (
    draw_offload_plans,
    offload_plan,
    parallel_step,
    plan,
    plan_for_this_machine,
)
from .policies import hit_rates
from .prefetch import Prefetch
from .prompts import blog_prompt, chat_ids, reference_ids, reference_tokenizer
from .quantize import QUALITY_TEXT, compare_logits, kernel_speeds
from .readings import blog_readings, compare_ids, hub_fast_tokenizer
from .sandbox import run_sandboxed
from .serving import room_load, start_local_server
from .sizing import (
    chance_hit_rate,
    decode_bytes,
    expected_distinct_experts,
    expert_bytes,
    fit_report,
    kv_bytes_per_token,
    memory_table,
    parameter_count,
)
from .standin import ensure_standin
from .tiers import TierRuns
from .widgets import SamplingPanel, distribution_explorer

__all__ = [
    "BLOG_SAMPLING",
    "Endpoint",
    "EndpointError",
    "Fit",
    "GPU_TYPES",
    "KNOWN_MODELS",
    "NextLayerGuess",
    "OffloadMeter",
    "Prefetch",
    "QUALITY_TEXT",
    "SamplingPanel",
    "TASKS",
    "TierRuns",
    "blog_prompt",
    "blog_readings",
    "chance_hit_rate",
    "chat_ids",
    "check_fits",
    "chrf",
    "compare_ids",
    "compare_logits",
    "cost_experiment",
    "decode_bytes",
    "describe",
    "dtype_name",
    "distribution_explorer",
    "diversity",
    "draw_loads",
    "draw_offload_plans",
    "edit_distance_cases",
    "ensure_standin",
    "expected_distinct_experts",
    "expert_bytes",
    "experts_per_token",
    "experts_read_per_step",
    "extract_code",
    "fast_recipe",
    "fit_report",
    "generate",
    "generate_batch",
    "generate_scored",
    "hit_rates",
    "hub_fast_tokenizer",
    "kernel_speeds",
    "kv_bytes_per_token",
    "load_pipeline",
    "measure_bandwidth",
    "memory_table",
    "model_path",
    "next_token_distribution",
    "notebook_bench",
    "offload_plan",
    "parallel_step",
    "parameter_count",
    "pick_dtype",
    "placement",
    "prefetch_recall",
    "plan",
    "plan_for_this_machine",
    "print_stream",
    "reference_ids",
    "reference_tokenizer",
    "room_load",
    "route_softmax_topk_renorm",
    "route_topk_then_softmax",
    "run_sandboxed",
    "start_local_server",
    "this_machine",
    "trace_generation",
    "weight_bytes",
]

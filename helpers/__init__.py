"""The one module every notebook imports: `from helpers import ...` gives exactly the names below.
Its files form layers that import downward only: README's "The code" shows them, tests/test_layers.py
holds the table."""

from .backends import Endpoint, EndpointError, describe, load_pipeline
from .benchmark import notebook_bench
from .checking import chrf, diversity, edit_distance_cases, extract_code
from .data import (
    BLOG_SAMPLING,
    BLOG_TRANSLATION,
    GB,
    GPU_TYPES,
    KNOWN_MODELS,
    LINK_GTS,
    LONGFELLOW,
    PEER_LINK_GBS,
    TASKS,
    GiB,
)
from .distribution import (
    candidates_per_step,
    generate_scored,
    next_token_distribution,
    steps_before_a_tie,
)
from .fastpath import fast_recipe
from .fitting import Fit
from .generation import BATCH_MIN_GAIN, generate, generate_batch, generate_many, print_stream
from .hardware import dtype_name, measure_bandwidth, this_machine
from .loading import check_fits, model_path, pick_dtype, placement, weight_bytes
from .moe import (
    NextLayerGuess,
    busiest_expert,
    chance_stickiness,
    cost_experiment,
    draw_loads,
    draw_routing,
    expert_load,
    experts_per_token,
    experts_read_per_step,
    prefetch_recall,
    route_softmax_topk_renorm,
    route_topk_then_softmax,
    stickiness,
    trace_generation,
)
from .offload import OffloadMeter, device_map_bytes, draw_device_map
from .planning import (
    draw_offload_plans,
    link_bandwidth,
    offload_plan,
    parallel_step,
    plan,
    plan_for_this_machine,
)
from .policies import POLICIES, hit_rates
from .prefetch import Prefetch
from .prompts import blog_prompt, chat_ids, reference_ids, reference_tokenizer, turn_starts
from .quantize import QUALITY_TEXT, compare_logits, kernel_speeds
from .readings import blog_readings, compare_ids, hub_fast_tokenizer
from .sandbox import run_sandboxed
from .serving import BATCHING_MIN_GAIN, QUEUE_MIN_WAIT_RATIO, room_load, start_local_server
from .sizing import (
    ceiling,
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
    "BATCHING_MIN_GAIN",
    "BATCH_MIN_GAIN",
    "BLOG_SAMPLING",
    "BLOG_TRANSLATION",
    "Endpoint",
    "EndpointError",
    "Fit",
    "GB",
    "GPU_TYPES",
    "GiB",
    "KNOWN_MODELS",
    "LINK_GTS",
    "LONGFELLOW",
    "NextLayerGuess",
    "OffloadMeter",
    "PEER_LINK_GBS",
    "POLICIES",
    "Prefetch",
    "QUALITY_TEXT",
    "QUEUE_MIN_WAIT_RATIO",
    "SamplingPanel",
    "TASKS",
    "TierRuns",
    "blog_prompt",
    "blog_readings",
    "busiest_expert",
    "candidates_per_step",
    "ceiling",
    "chance_hit_rate",
    "chance_stickiness",
    "chat_ids",
    "check_fits",
    "chrf",
    "compare_ids",
    "compare_logits",
    "cost_experiment",
    "decode_bytes",
    "describe",
    "dtype_name",
    "device_map_bytes",
    "distribution_explorer",
    "diversity",
    "draw_device_map",
    "draw_loads",
    "draw_offload_plans",
    "draw_routing",
    "edit_distance_cases",
    "ensure_standin",
    "expected_distinct_experts",
    "expert_bytes",
    "expert_load",
    "experts_per_token",
    "experts_read_per_step",
    "extract_code",
    "fast_recipe",
    "fit_report",
    "generate",
    "generate_batch",
    "generate_many",
    "generate_scored",
    "hit_rates",
    "hub_fast_tokenizer",
    "kernel_speeds",
    "kv_bytes_per_token",
    "link_bandwidth",
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
    "steps_before_a_tie",
    "stickiness",
    "this_machine",
    "trace_generation",
    "turn_starts",
    "weight_bytes",
]

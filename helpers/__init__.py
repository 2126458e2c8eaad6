"""Helpers shared by every notebook: loading, prompts, generation, hardware."""
from .generation import (BLOG_SAMPLING, Answer, candidates_per_step, generate, generate_batch, generate_many,
                         print_stream, steps_before_a_tie, validate_sampling)
from .hardware import DTYPE_ENV, cpu_has_native_bf16, fit_report, gpus, pick_dtype, system_memory, torch_build
from .models import (KNOWN_MODELS, MODEL_ENV, ModelNotAvailable, ModelTooLarge, check_fits, describe,
                     load_pipeline, mixtral_config, model_path, parameter_count, placement,
                     resolve_local)
from .prompts import (BLOG_TEMPLATE, TASKS, blog_prompt, chat_ids, compare_ids, reference_ids,
                      reference_tokenizer, token_table)
from .standin import ensure_standin, standin_dir
from .serving import Endpoint, EndpointError, start_local_server

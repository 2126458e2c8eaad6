"""The other route issue 15 asked to measure: torchao through transformers' TorchAoConfig, on the
stand-in, on this CPU. Which parameters it quantizes, and whether the model still runs and how fast.
torchao is not a dependency of the package; install it into the venv first:

    .venv/bin/pip install torchao==0.18.0
    .venv/bin/python benchmarks/torchao_probe.py      # writes benchmarks/results/<date>-torchao-cpu.md

Each configuration loads in a process of its own (python benchmarks/torchao_probe.py --one NAME).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROUTES = (
    "none",
    "linear layers (TorchAoConfig(Int8WeightOnlyConfig()))",
    "linear layers and the 3-D experts by name (FqnToConfig)",
)


def one(route: str) -> dict:
    """Load the stand-in in float32 with `route`, count what torchao quantized, time 24 greedy tokens."""
    from collections import OrderedDict

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

    from helpers.answers import decode_rate
    from helpers.backends import LocalModel
    from helpers.data import TASKS
    from helpers.prompts import chat_ids
    from helpers.standin import ensure_standin

    kwargs = {}
    if route != "none":
        import torchao
        from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig

        config = Int8WeightOnlyConfig()
        if "experts" in route:
            config = FqnToConfig(
                OrderedDict(
                    [
                        (r"re:.*experts\.gate_up_proj", Int8WeightOnlyConfig()),
                        (r"re:.*experts\.down_proj", Int8WeightOnlyConfig()),
                        ("_default", Int8WeightOnlyConfig()),
                    ]
                )
            )
        kwargs["quantization_config"] = TorchAoConfig(config)
    path = str(ensure_standin())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    kinds: dict[str, int] = {}
    for _, p in model.named_parameters():
        kinds[type(p.data).__name__] = kinds.get(type(p.data).__name__, 0) + p.numel()
    row = dict(route=route, torchao=torchao.__version__ if route != "none" else None, parameters=kinds)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = chat_ids(tokenizer, TASKS["poem"]["prompt"])
    try:
        runner = LocalModel(model=model, tokenizer=tokenizer)
        times = runner.run([ids], dict(do_sample=False, max_new_tokens=24, min_new_tokens=24))[0].token_times
        row["decode_tok_s"] = decode_rate(times, warmup=4)
    except Exception as exc:  # noqa: BLE001 - the failure is the finding
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return row


def main() -> int:
    import torch
    import transformers

    from helpers.files import atomic_file

    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(one(sys.argv[2])))
        return 0
    rows = []
    for route in ROUTES:
        done = subprocess.run([sys.executable, __file__, "--one", route], capture_output=True, text=True)
        rows.append(
            json.loads(done.stdout.strip().splitlines()[-1])
            if done.returncode == 0
            else dict(route=route, error=(done.stderr.strip().splitlines() or ["?"])[-1])
        )
        print(rows[-1], flush=True)
    date = time.strftime("%Y-%m-%d")
    lines = [
        f"# torchao on the stand-in, {date}",
        "",
        "`benchmarks/torchao_probe.py`: the stand-in in float32 on this CPU, int8 weight-only through "
        "transformers' `TorchAoConfig`; 24 greedy tokens of the poem prompt, decode tok/s after 4 warm-up steps "
        f"(torch {torch.__version__}, transformers {transformers.__version__}).",
        "",
        "| route | torchao | parameters by tensor type | decode tok/s or failure |",
        "|---|---|---|---|",
    ]
    for r in rows:
        kinds = ", ".join(f"{k} {v / 1e6:,.1f} M" for k, v in r.get("parameters", {}).items())
        result = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else f"failed: {r.get('error', '?')}"
        lines.append(f"| {r['route']} | {r.get('torchao') or '-'} | {kinds} | {result} |")
    path = ROOT / "benchmarks" / "results" / f"{date}-torchao-cpu.md"
    atomic_file(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

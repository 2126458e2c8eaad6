"""What the blog's bf16 costs on the stand-in, measured as 10_quantization measures int8 and int4: the stand-in
loaded in bf16 against the same weights in float32 (both the blog's plain pipeline), teacher-forced over the shipped
text (helpers.quantize.compare_logits: top-1 agreement, mean KL, both perplexities). It runs apart from 10, whose
kernel would otherwise hold a fourth copy of the model.

    python benchmarks/bf16_quality.py      # writes benchmarks/results/<date>-bf16-quality.json and .md
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def markdown(f: dict) -> str:
    q = f["quality"]
    return (
        f"# bf16 against float32 on the stand-in, {f['date']}\n\n"
        f"`python benchmarks/bf16_quality.py`: torch {f['torch']}, {f['machine']}. Teacher-forced over "
        f"`{f['text']}` ({q['tokens']:,} tokens, windows of {f['window']}), both models the blog's plain pipeline "
        f"(`fast=False`).\n\n"
        "| candidate | top-1 agreement | mean KL | perplexity | float32's |\n|---|---|---|---|---|\n"
        f"| bf16 | {q['top1_agreement']:.1%} | {q['mean_kl']:.4f} | {q['perplexity_candidate']:.3f} | "
        f"{q['perplexity_reference']:.3f} |\n"
    )


def main() -> int:
    import torch
    from bench import machine_name

    from helpers import QUALITY_TEXT, compare_logits, load_pipeline, model_path
    from helpers.files import atomic_file

    reference = load_pipeline(model_path(), dtype=torch.float32, fast=False)
    in_bf16 = load_pipeline(model_path(), dtype=torch.bfloat16, fast=False)
    ids = reference.tokenizer(QUALITY_TEXT.read_text())["input_ids"]
    window = 512  # tokens per teacher-forced pass, as 10_quantization reads the text
    figures = dict(
        date=datetime.date.today().isoformat(),
        machine=machine_name(),
        torch=torch.__version__,
        text=QUALITY_TEXT.name,
        window=window,
        quality=compare_logits(reference.model, {"bf16": in_bf16.model}, ids, window)["bf16"],
    )
    out = ROOT / "benchmarks" / "results" / f"{figures['date']}-bf16-quality"
    atomic_file(out.with_suffix(".json"), lambda p: p.write_text(json.dumps(figures, indent=1)))
    atomic_file(out.with_suffix(".md"), lambda p: p.write_text(markdown(figures)))
    print(markdown(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

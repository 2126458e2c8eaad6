import re
from pathlib import Path

import pytest

from helpers import (
    TASKS,
    blog_prompt,
    blog_readings,
    chat_ids,
    compare_ids,
    hub_fast_tokenizer,
    reference_ids,
    reference_tokenizer,
)
from helpers import BLOG_SAMPLING
from helpers.prompts import turn_starts

BLOG = Path(__file__).resolve().parents[2] / "shared" / "source" / "rocm-blog-mixtral-8x22b.md"

CONVERSATIONS = {
    "single-turn": ("Tell me some jokes about semiconductors.", None),
    "system": ("Tell me some jokes about semiconductors.", "Answer in French."),
    "multi-turn": (
        [
            {"role": "user", "content": "Write a poem about silicon."},
            {"role": "assistant", "content": "Silicon dreams in crystal light."},
            {"role": "user", "content": "Now make it rhyme."},
        ],
        None,
    ),
    "multi-turn + system": (
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Translate 'selva oscura'."},
        ],
        "Be brief.",
    ),
}


@pytest.fixture(scope="module", params=[32768, 32000], ids=["v3-8x22B", "v1-8x7B"])
def mixtral_tokenizer(request):
    return request.param, reference_tokenizer(request.param)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_template_ids_equal_mistral_common(mixtral_tokenizer, name):
    vocab, tokenizer = mixtral_tokenizer
    prompt, system = CONVERSATIONS[name]
    assert chat_ids(tokenizer, prompt, system) == reference_ids(prompt, vocab, system)


INST, END, SPACE = 3, 4, 29473  # [INST], [/INST] and a lone "▁" in the v3 vocabulary
AS_TEXT = {INST: [1501, 17057, 29561], END: [1501, 29516, 17057, 29561]}  # ▁[ INST ]  and  ▁[ / INST ]


@pytest.mark.parametrize("task", TASKS)
def test_what_the_blog_string_becomes_in_four_stacks(task):
    """(a)-(d) of notebook 01, for each blog prompt, from the reference's own ids."""
    readings = list(blog_readings(TASKS[task]["prompt"]).values())
    may_2024, today, common_backend, reference = readings
    assert reference[:2] == [1, INST] and reference[-1] == END
    words = reference[2:-1]
    assert INST not in words and END not in words and SPACE not in words[-1:]
    assert may_2024 == [INST] + words + [SPACE, END]  # no <s>; the blog's space before [/INST] is a token
    assert today == [1] + may_2024  # today's pipeline lets the tokenizer add <s>
    assert common_backend == [1] + AS_TEXT[INST] + words + AS_TEXT[END]  # the markers as plain text


def test_the_four_readings_of_the_jokes_prompt_id_by_id():
    words = [16027, 1296, 1509, 24640, 1452, 4314, 4558, 3246, 1502, 29491]  # ▁Tell ▁me ▁some ... ors .
    assert blog_readings(TASKS["jokes"]["prompt"]) == {
        "(a) May 2024 pipeline": [3, *words, 29473, 4],
        "(b) today's pipeline": [1, 3, *words, 29473, 4],
        "(c) MistralCommonBackend": [1, 1501, 17057, 29561, *words, 1501, 29516, 17057, 29561],
        "(d) mistral-common": [1, 3, *words, 4],
    }


def test_todays_pipeline_code_feeds_reading_b(tiny_mixtral_dir):
    from transformers import pipeline

    pipe = pipeline("text-generation", model=str(tiny_mixtral_dir), tokenizer=hub_fast_tokenizer())
    prompt = TASKS["poem"]["prompt"]
    fed = pipe.preprocess(blog_prompt(prompt))["input_ids"][0].tolist()
    assert fed == blog_readings(prompt)["(b) today's pipeline"]


def test_the_rebuilt_fast_tokenizer_splits_the_control_tokens_out_of_text():
    fast = hub_fast_tokenizer()
    assert fast.convert_ids_to_tokens([1, 2, 3, 4]) == ["<s>", "</s>", "[INST]", "[/INST]"]
    assert fast("[INST]x[/INST]", add_special_tokens=False)["input_ids"][::2] == [3, 4]
    assert fast.backend_tokenizer.pre_tokenizer.prepend_scheme == "first"  # the non-legacy assumption


@pytest.mark.parametrize("task", TASKS)
def test_v1_blog_string_happens_to_be_right(task):
    tokenizer = reference_tokenizer(32000)
    prompt = TASKS[task]["prompt"]
    assert tokenizer(blog_prompt(prompt))["input_ids"] == reference_ids(prompt, 32000)


def test_standin_uses_its_own_chatml_template(standin_tokenizer):
    text = standin_tokenizer.decode(chat_ids(standin_tokenizer, "Hi"))
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi<|im_end|>" in text


def test_compare_ids_names_each_difference_from_the_reference():
    table = compare_ids(reference_tokenizer(32768), {"x": [3, 1501, 29473, 4], "ref": [1, 3, 1032, 4]})
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["x", "4", "ids:"] and lines[1].startswith("ref ")
    assert lines[2] == "x against ref: drops <s>(1); spells ▁a(1032) as ▁[(1501) ▁(29473)"
    same = compare_ids(reference_tokenizer(32768), {"x": [1, 3], "ref": [1, 3]})
    assert same.splitlines()[-1] == "x against ref: identical"


@pytest.mark.parametrize(
    "bad, message",
    [
        ("", "empty"),
        ("  \n", "empty"),
        ([{"role": "robot", "content": "hi"}], "role"),
        ([{"role": "user", "content": None}], "role"),
    ],
)
def test_bad_prompts_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        chat_ids(reference_tokenizer(32768), bad)


def test_blog_template_is_kept_verbatim():
    assert blog_prompt("X") == "[INST] X [/INST]"


@pytest.mark.skipif(not BLOG.is_file(), reason="../shared/source is not beside this checkout")
def test_tasks_match_the_blog_exactly():
    text = BLOG.read_text()
    prompts = re.findall(r'^prompt = "(.*)"$', text, flags=re.M)
    budgets = [int(n) for n in re.findall(r"max_new_tokens=(\d+)", text)]
    assert prompts == [t["prompt"] for t in TASKS.values()]
    assert budgets == [t["max_new_tokens"] for t in TASKS.values()] == [512, 512, 128, 128]
    assert text.count("do_sample=True") == 4 and text.count("temperature=0.8") == 4
    assert text.count("top_k=20") == 4 and text.count("top_p=0.95") == 4
    assert BLOG_SAMPLING == dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.95)
    assert "prompt_template=f'''[INST] {prompt} [/INST]'''" in text


@pytest.mark.parametrize("task", TASKS)
def test_turn_starts_finds_the_users_first_word(task, standin_tokenizer):
    prompt = TASKS[task]["prompt"]
    for tokenizer in (standin_tokenizer, reference_tokenizer(32768)):
        parts, ids = turn_starts(tokenizer, prompt), chat_ids(tokenizer, prompt)
        first_word = tokenizer.convert_ids_to_tokens(ids[parts["user's words"]])
        assert first_word.lstrip("▁Ġ") == prompt.split()[0] and parts["answer"] == len(ids)
    assert turn_starts(reference_tokenizer(32768), prompt)["user's words"] == 2  # <s> [INST] ▁Write ...


def test_the_hub_file_variants_of_reading_a():
    """Notebook 01's variants: what the reconstruction's assumptions change, for the jokes prompt."""
    text, a = (
        blog_prompt(TASKS["jokes"]["prompt"]),
        blog_readings(TASKS["jokes"]["prompt"])["(a) May 2024 pipeline"],
    )
    assert (
        hub_fast_tokenizer(add_bos_token=False)(text)["input_ids"] == a
    )  # April 2024's add_bos_token: false
    legacy = hub_fast_tokenizer(legacy=True)(text, add_special_tokens=False)["input_ids"]
    assert legacy == [INST, 1027, 23235, *a[2:]]  # ▁Tell becomes ▁▁ Tell
    swallowed = hub_fast_tokenizer(legacy=True, normalized=True)(text, add_special_tokens=False)["input_ids"]
    assert swallowed == [INST, *a[1:-2], END]  # the blog's space goes into the match for [/INST]
    assert (
        hub_fast_tokenizer()(text, add_special_tokens=False)["input_ids"] == a
    )  # the cached default is untouched


def test_the_legacy_variant_is_transformers_own_legacy_normalizer():
    from types import SimpleNamespace
    from transformers.convert_slow_tokenizer import LlamaConverter

    marked = SimpleNamespace(original_tokenizer=SimpleNamespace(legacy=True, add_prefix_space=True))
    expected = LlamaConverter.normalizer(marked, None)
    assert repr(hub_fast_tokenizer(legacy=True).backend_tokenizer.normalizer) == repr(expected)
    assert hub_fast_tokenizer(legacy=True).backend_tokenizer.pre_tokenizer is None
    assert LlamaConverter.pre_tokenizer(marked, "▁", True) is None


def test_a_lone_space_piece_precedes_numbers_in_ordinary_text():
    assert reference_tokenizer(32768)("in 2024", add_special_tokens=False)["input_ids"][:2] == [1065, SPACE]

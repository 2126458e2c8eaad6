import re
from pathlib import Path

import pytest

from helpers import TASKS, blog_prompt, chat_ids, compare_ids, reference_ids, reference_tokenizer
from helpers import BLOG_SAMPLING

BLOG = Path(__file__).resolve().parents[2] / "shared" / "source" / "rocm-blog-mixtral-8x22b.md"

CONVERSATIONS = {
    "single-turn": ("Tell me some jokes about semiconductors.", None),
    "system": ("Tell me some jokes about semiconductors.", "Answer in French."),
    "multi-turn": ([{"role": "user", "content": "Write a poem about silicon."},
                    {"role": "assistant", "content": "Silicon dreams in crystal light."},
                    {"role": "user", "content": "Now make it rhyme."}], None),
    "multi-turn + system": ([{"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello! How can I help?"},
                             {"role": "user", "content": "Translate 'selva oscura'."}], "Be brief."),
}


@pytest.fixture(scope="module", params=[32768, 32000], ids=["v3-8x22B", "v1-8x7B"])
def mixtral_tokenizer(request):
    return request.param, reference_tokenizer(request.param)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_template_ids_equal_mistral_common(mixtral_tokenizer, name):
    vocab, tokenizer = mixtral_tokenizer
    prompt, system = CONVERSATIONS[name]
    assert chat_ids(tokenizer, prompt, system) == reference_ids(prompt, vocab, system)


@pytest.mark.parametrize("task", TASKS)
def test_v3_control_tokens_and_the_blog_string_is_wrong(task):
    tokenizer = reference_tokenizer(32768)
    prompt = TASKS[task]["prompt"]
    ids = chat_ids(tokenizer, prompt)
    assert ids[:2] == [1, 3] and ids[-1] == 4  # <s> [INST] ... [/INST]
    blog_ids = tokenizer(blog_prompt(prompt))["input_ids"]
    assert blog_ids != ids
    assert 3 not in blog_ids and 4 not in blog_ids  # the literal text is not the control token
    assert tokenizer.convert_ids_to_tokens(blog_ids[1:4]) == ["▁[", "INST", "]"]


@pytest.mark.parametrize("task", TASKS)
def test_v1_blog_string_happens_to_be_right(task):
    tokenizer = reference_tokenizer(32000)
    prompt = TASKS[task]["prompt"]
    assert tokenizer(blog_prompt(prompt))["input_ids"] == reference_ids(prompt, 32000)


def test_standin_uses_its_own_chatml_template(standin_tokenizer):
    text = standin_tokenizer.decode(chat_ids(standin_tokenizer, "Hi"))
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi<|im_end|>" in text


def test_compare_ids_marks_differences():
    tokenizer = reference_tokenizer(32768)
    table = compare_ids(tokenizer, [1, 1501, 17057], [1, 3])
    lines = table.splitlines()
    assert "differs" not in lines[1] and "differs" in lines[2] and "differs" in lines[3]


@pytest.mark.parametrize("bad, message", [
    ("", "empty"), ("  \n", "empty"),
    ([{"role": "robot", "content": "hi"}], "role"),
    ([{"role": "user", "content": None}], "role"),
])
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

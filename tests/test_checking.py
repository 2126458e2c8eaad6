import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from helpers.checking import (
    chrf,
    distinct_n,
    diversity,
    duplicate_lines,
    edit_distance,
    edit_distance_cases,
    extract_code,
)
from helpers.data import BLOG_TRANSLATION, LONGFELLOW, TASKS
from helpers.sandbox import Limits, run_sandboxed

DP = """def minDistance(word1, word2):
    m, n = len(word1), len(word2)
    dp = [[0] * (n + 1) for _ in range(m + 1)]
    for i in range(m + 1):
        dp[i][0] = i
    for j in range(n + 1):
        dp[0][j] = j
    for i in range(1, m + 1):
        for j in range(1, n + 1):
            if word1[i - 1] == word2[j - 1]:
                dp[i][j] = dp[i - 1][j - 1]
            else:
                dp[i][j] = min(dp[i - 1][j], dp[i][j - 1], dp[i - 1][j - 1]) + 1
    return dp[m][n]
"""

# ---------------------------------------------------------------- extraction


def test_fenced_python_block():
    answer = f"Here is the code:\n\n```python\n{DP}```\n\nIt uses dynamic programming."
    assert extract_code(answer) == DP


def test_unfenced_function_as_in_the_blog():
    answer = (
        "The problem you're describing is a classic dynamic programming problem.\n\n"
        + DP
        + "\nThis function works by creating a 2D table."
    )
    assert extract_code(answer).strip() == DP.strip()


def test_several_blocks_python_first():
    answer = "```bash\npip install nothing\n```\nthen\n```py\nimport math\n```\nand\n```python\ndef f(a, b):\n    return 0\n```"
    assert extract_code(answer) == "import math\n\ndef f(a, b):\n    return 0\n"


def test_untagged_fence_and_unclosed_fence():
    assert extract_code("```\ndef f(a, b):\n    return 1\n```") == "def f(a, b):\n    return 1\n"
    assert extract_code("```python\ndef f(a, b):\n    return 2\n") == "def f(a, b):\n    return 2\n"


def test_prose_only_and_other_languages_have_no_code():
    assert extract_code("Edit distance counts insertions, deletions and replacements.") is None
    assert extract_code("```c\nint minDistance(char *a, char *b) { return 0; }\n```") is None


# ---------------------------------------------------------------- the reference


@pytest.mark.parametrize(
    "a, b, d",
    [
        ("horse", "ros", 3),
        ("intention", "execution", 5),
        ("", "", 0),
        ("", "abc", 3),
        ("abc", "", 3),
        ("same", "same", 0),
        ("kitten", "sitting", 3),
        ("café", "cafe", 1),
        ("🙂🙃", "🙃🙂", 2),
    ],
)
def test_reference_edit_distance(a, b, d):
    assert edit_distance(a, b) == d == edit_distance(b, a)


def test_cases_hold_the_classics_and_seeded_random_pairs():
    cases = edit_distance_cases(random_pairs=10, seed=1)
    assert ("horse", "ros", 3) in cases and ("intention", "execution", 5) in cases
    assert cases == edit_distance_cases(random_pairs=10, seed=1)
    assert cases != edit_distance_cases(random_pairs=10, seed=2)
    assert all(edit_distance(a, b) == d for a, b, d in cases)


# ---------------------------------------------------------------- the sandbox: every status


def test_correct_code_passes():
    result = run_sandboxed(DP)
    assert result.status == "passed" and result.passed == len(result.cases) == len(edit_distance_cases())
    assert "PASSED" in result.verdict() and "pass" in result.table()


def test_leetcode_style_class_is_found():
    code = "class Solution:\n" + "\n".join(
        "    " + line
        for line in DP.replace("def minDistance(word1", "def minDistance(self, word1").splitlines()
    )
    result = run_sandboxed(code)
    assert result.status == "passed" and result.detail == "tested Solution().minDistance"


def test_wrong_answer_is_counted():
    result = run_sandboxed("def minDistance(a, b):\n    return abs(len(a) - len(b))\n")
    assert result.status == "wrong answer" and 0 < result.passed < len(result.cases)
    assert "FAIL" in result.table() and result.verdict().startswith("WRONG ANSWER")


def test_exception_is_reported():
    result = run_sandboxed("def f(a, b):\n    return a[100]\n")
    assert result.status == "exception" and "IndexError" in result.detail


@pytest.mark.parametrize("code", [None, "", "Just prose, no code."])
def test_no_code(code):
    assert run_sandboxed(extract_code(code) if code else code).status == "no function found"


def test_not_python_at_all():
    result = run_sandboxed("int minDistance(char *a, char *b) { return 0; }")
    assert result.status == "no function found" and "not valid Python" in result.detail


def test_no_two_argument_function():
    assert run_sandboxed("x = 1\ndef f(a):\n    return a\n").status == "no function found"


def test_infinite_loop_times_out():
    result = run_sandboxed("def f(a, b):\n    while True:\n        pass\n", limits=Limits(timeout_s=2))
    assert result.status == "timeout" and 2 <= result.seconds < 5


def test_sleeping_code_times_out():
    result = run_sandboxed("import time\ndef f(a, b):\n    time.sleep(60)\n", limits=Limits(timeout_s=1))
    assert result.status == "timeout" and result.seconds < 4


def test_unbounded_allocation_hits_the_memory_limit():
    code = "def f(a, b):\n    hoard = []\n    while True:\n        hoard.append(bytearray(10**7))\n"
    result = run_sandboxed(code, limits=Limits(memory_mb=256))
    assert result.status == "killed by a limit" and "memory" in result.detail


def test_cpu_limit_kills_a_busy_loop_before_the_wall_clock():
    result = run_sandboxed(
        "def f(a, b):\n    while True:\n        pass\n", limits=Limits(timeout_s=20, cpu_s=1)
    )
    assert result.status == "killed by a limit" and "CPU" in result.detail and result.seconds < 10


def test_fork_bomb_is_stopped():
    result = run_sandboxed("import os\ndef f(a, b):\n    while True:\n        os.fork()\n")
    assert result.status == "exception" and "os.fork" in result.detail


@pytest.mark.parametrize(
    "code, blocked",
    [
        ("import subprocess\ndef f(a, b):\n    return 0\n", "import subprocess"),
        ("import os\ndef f(a, b):\n    os.system('touch /tmp/sandbox-escape')\n    return 0\n", "os.system"),
        ("import ctypes\ndef f(a, b):\n    return 0\n", "ctypes"),
        ("import socket\ndef f(a, b):\n    socket.create_connection(('127.0.0.1', 9))\n", "import socket"),
    ],
)
def test_processes_sockets_and_ctypes_are_blocked(code, blocked):
    result = run_sandboxed(code)
    assert result.status == "exception" and blocked in result.detail
    assert not Path("/tmp/sandbox-escape").exists()


def test_writing_outside_its_directory_is_blocked(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run_sandboxed(f"def f(a, b):\n    open({str(target)!r}, 'w').write('x')\n    return 0\n")
    assert (
        result.status == "exception"
        and f"blocked by the audit hook: open {target} for writing" in result.detail
    )
    assert not target.exists()


def test_writing_inside_its_directory_is_allowed_but_capped():
    ok = run_sandboxed("def f(a, b):\n    open('scratch.txt', 'w').write('x')\n    return 0\n")
    assert ok.status == "wrong answer"  # it ran (and returned 0)
    big = run_sandboxed(
        "def f(a, b):\n    open('big.txt', 'w').write('x' * (4 << 20))\n    return 0\n",
        limits=Limits(file_mb=1),
    )
    assert big.status == "killed by a limit" and "file size" in big.detail


def test_environment_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    code = "import os\ndef f(a, b):\n    print(dict(os.environ))\n    return os.environ.get('HF_TOKEN', 'absent')\n"
    result = run_sandboxed(code, cases=[("a", "b", 1)])
    assert result.cases[0][3] == "absent" and "hf_secret_value" not in result.output


def test_megabytes_of_output_are_capped():
    result = run_sandboxed(
        "def f(a, b):\n    print('x' * 10_000_000)\n    return 0\n", limits=Limits(output_kib=64)
    )
    assert result.status == "killed by a limit" and len(result.output) == 64 * 1024


def test_the_notebook_process_is_unharmed(monkeypatch):
    # a temporary folder of this test's own (other tests' sandboxes may come and go in /tmp meanwhile),
    # open to the user the sandbox runs as
    own = Path(tempfile.mkdtemp(prefix="unharmed-"))
    own.chmod(0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(own))
    try:
        before = (os.getcwd(), dict(os.environ))
        for code in [
            "import os\ndef f(a, b):\n    os.chdir('/')\n    os.environ['X'] = '1'\n    return 0\n",
            "import sys\ndef f(a, b):\n    sys.exit(3)\n",
        ]:
            assert run_sandboxed(code).status in ("wrong answer", "exception")  # it ran there
        assert (os.getcwd(), dict(os.environ)) == before
        assert os.listdir(own) == []  # its temporary folders removed
    finally:
        shutil.rmtree(own, ignore_errors=True)


# ---------------------------------------------------------------- translation and jokes


def test_chrf_of_the_reference_against_itself_is_100():
    assert chrf(LONGFELLOW) == pytest.approx(100.0)
    assert (TASKS["translation"]["reference"], TASKS["translation"]["blog_answer"]) == (
        LONGFELLOW,
        BLOG_TRANSLATION,
    )


def test_chrf_of_a_wrong_sentence_is_low_and_the_blog_scores_between():
    wrong = chrf("The weather in Paris is sunny and warm today.")
    blog = chrf(BLOG_TRANSLATION)
    assert wrong < 20 < blog < 100


def test_chrf_rejects_non_text():
    with pytest.raises(TypeError, match="chrF scores text"):
        chrf(None)


def test_diversity_measures():
    same = ["Why did the chip cross the road?"] * 3
    varied = ["Why did the chip cross the road?", "A transistor walks into a bar.", "Silicon is my valley."]
    assert distinct_n(same, 2) < distinct_n(varied, 2) == 1.0
    assert duplicate_lines(same) == 2 and duplicate_lines(varied) == 0
    assert diversity(varied)["samples"] == 3
    assert distinct_n([], 1) == 0.0


def test_the_sandbox_refuses_systems_where_its_limits_are_unverified(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(OSError, match="Linux only .*darwin.*WSL 2"):
        run_sandboxed("def minDistance(a, b):\n    return 0\n", [("a", "b", 1)])

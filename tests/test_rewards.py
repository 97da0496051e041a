"""flowgraph.rl.rewards and its sandbox: answer extraction and equivalence tables, the
format reward, code answers that pass, fail, loop, flood, hog memory, reach for the
network, exit early, crash or fork, and scoring rows in worker processes."""

import math
import os
import re
import socket
import sys
import threading
import time

import pytest
import torch

from flowgraph.errors import ConfigError, DataError
from flowgraph.rl import sandbox
from flowgraph.rl.rewards import (
    REWARDS,
    RewardError,
    code_reward,
    extract_answer,
    extract_code,
    format_reward,
    math_equal,
    math_reward,
    reward_function,
    score_rows,
    shutdown_pools,
)
from flowgraph.rl.sandbox import OUTPUT_LIMIT, run_python

SLACK = 3.0  # seconds beyond a timeout that a busy 2-core machine may need


@pytest.fixture(scope="module", autouse=True)
def _stop_pools():
    yield
    shutdown_pools()


# -- extract_answer -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("first \\boxed{1}, then \\boxed{2}", "2"),
        ("$\\boxed{\\frac{1}{\\sqrt{2}}}$", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5 is it", "5"),
        ("cut off: \\boxed{3 and then", "3"),  # unbalanced: not a box; the last number
        ("\\boxed{1}\n#### 2", "1"),  # a box before ####
        ("48/2 = 24 clips in May.\n#### 72", "72"),
        ("#### 1,234", "1,234"),
        ("The answer is 3\n#### 4", "4"),  # #### before the phrase
        ("The answer is 17.", "17"),
        ("Answer: -3.5", "-3.5"),
        ("**Answer:** 12", "12"),
        ("so the final answer is: $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("I think 3, no wait, 5 apples", "5"),
        ("it costs 1,000,000 dollars", "1,000,000"),
        ("half is 1/2", "1/2"),
        ("so -\\frac{3}{4} it is", "-\\frac{3}{4}"),
        ("version 2.0 then 7.", "7"),
        ("no numbers here", None),
        ("", None),
        (None, None),
        (42, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# -- math_equal ---------------------------------------------------------------------------
EQUAL = [
    ("42", "42"), ("1,000", "1000"), ("1 000 000", "1000000"), ("3.0", "3"), ("0.5", "1/2"),
    ("\\frac{1}{2}", "0.5"), ("\\dfrac{3}{4}", "3/4"), ("\\tfrac34", "0.75"), ("2/4", "1/2"),
    ("-2", "-2"), ("-\\frac{1}{2}", "-0.5"), ("\\frac{-1}{2}", "-1/2"), ("\u22125", "-5"),
    ("50%", "50"), ("50\\%", "0.5"), ("0.5", "50%"), ("$5", "5"), ("\\$5.00", "5"),
    ("5 cm", "5"), ("10 \\text{ meters}", "10"), ("90^\\circ", "90"), ("x = 3", "3"),
    ("3.", "3"), ("{7}", "7"), ("0.33333", "1/3"), ("1e3", "1000"), ("(1, 2)", "(1,2)"),
    ("(0.5, 2)", "(\\frac12, 2)"), ("\\left( 1,2 \\right)", "(1,2)"), ("\\sqrt2", "\\sqrt{2}"),
    ("Yes", "yes"), ("\\boxed{4}", "4"), (4, "4"),
]  # fmt: skip
UNEQUAL = [
    ("42", "43"), ("0.333", "1/3"), ("-2", "2"), ("1/2", "2"), ("1,2", "12"), ("3 or 4", "3"),
    ("(1, 2)", "(2, 1)"), ("(1,2)", "[1,2]"), ("", "0"), ("", ""), ("garbage", "5"),
    ("5 apples and 3 pears", "5"), ("0.1+0.2", "0.3"), ("1.5", "1.5003"), ("2%", "2.5"),
    (None, "1"), ("1", None),
]  # fmt: skip
GARBAGE = ["\\boxed{", "{{{{", "}}}}", "\\frac{", "\\frac{1}{0}", "1/0", "1e99999", "9" * 5000,
           "((((", "%", "-", ".", "/", "1/", "$$", "\x00", "1e999", "\\frac{\\frac{1}{0}}{0}",
           "(1,(2,3)", "[,]", "(,)"]  # fmt: skip


@pytest.mark.parametrize(("predicted", "reference"), EQUAL)
def test_math_equal(predicted, reference):
    assert math_equal(predicted, reference)
    assert math_equal(reference, predicted)


@pytest.mark.parametrize(("predicted", "reference"), UNEQUAL)
def test_math_unequal(predicted, reference):
    assert not math_equal(predicted, reference)


def test_math_equal_never_raises_on_garbage():
    start = time.monotonic()
    for a in GARBAGE:
        for b in [*GARBAGE, "0", "1"]:
            assert isinstance(math_equal(a, b), bool)
    assert not math_equal("1/0", "0") and not math_equal("1e999", "1")
    assert time.monotonic() - start < 2  # no huge powers of ten


# -- math_reward --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("answer", "solution", "score"),
    [
        ("3 + 4 is 7, so \\boxed{7}", "She has 3 + 4 = 7 apples.\n#### 7", 1.0),
        ("72", 72, 1.0),  # a number column (Parquet)
        ("the answer is 0.75", "\\frac{3}{4}", 1.0),  # a bare LaTeX reference
        ("5", "so she has 5 apples left", 1.0),  # an unmarked solution: its last number
        ("\\boxed{8}", "#### 7", 0.0),
        ("I do not know", "7", 0.0),
        (None, "7", 0.0),
        ("7", None, 0.0),
    ],
)
def test_math_reward(answer, solution, score):
    assert math_reward({"prompt": "q", "answer": answer, "solution": solution}) == score


def test_math_reward_reads_the_column_it_is_told_and_names_a_missing_one():
    assert math_reward({"answer": "6", "target": "6"}, key="target") == 1.0
    with pytest.raises(DataError, match=r"no 'solution' column \(it has: prompt, answer\)"):
        math_reward({"prompt": "q", "answer": "6"})
    with pytest.raises(DataError, match="no 'answer' column"):
        math_reward({"prompt": "q", "solution": "6"})


# -- format_reward ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("answer", "score"),
    [
        ("<think>2 + 2 = 4</think><answer>4</answer>", 1.0),
        ("\n<think>\nlong\nthought\n</think>\n\n<answer>\n4\n</answer>\n", 1.0),
        ("<answer>4</answer>", 0.0),  # no reasoning
        ("<think>hm</think><answer> </answer>", 0.0),  # an empty answer
        ("<think>hm</think><answer>4</answer> and more", 0.0),
        ("so: <think>hm</think><answer>4</answer>", 0.0),
        ("<answer>4</answer><think>hm</think>", 0.0),
        ("<think>hm</think>4", 0.0),
        ("4", 0.0),
        (None, 0.0),
    ],
)
def test_format_reward_default_pattern(answer, score):
    assert format_reward({"prompt": "q", "answer": answer}) == score


def test_format_reward_with_a_pattern_and_its_errors():
    row = {"answer": "so \\boxed{4}"}
    assert format_reward(row, pattern=r"\\boxed\{.+\}") == 1.0
    assert format_reward(row, pattern=re.compile(r"^\d+$")) == 0.0
    with pytest.raises(ConfigError, match=r"pattern '\(unclosed' is not a regular expression"):
        format_reward(row, pattern="(unclosed")
    with pytest.raises(DataError, match="no 'answer' column"):
        format_reward({"prompt": "q"})


# -- extract_code -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("Here:\n```python\nx = 1\n```\nDone.", "x = 1\n"),
        ("```py\nx = 1\n```", "x = 1\n"),
        ("```python\nx = 1\n```\nbetter:\n```python\nx = 2\n```", "x = 2\n"),
        ("```\nx = 3\n```", "x = 3\n"),
        ("```python\nx = 1\n```\n```bash\nls\n```\n```\nplain\n```", "x = 1\n"),
        ("cut off:\n```python\ndef f():\n    return", "def f():\n    return"),
        ("x = 4", "x = 4"),
        ("```bash\nls\n```", "```bash\nls\n```"),  # no Python: the whole text
    ],
)
def test_extract_code(text, code):
    assert extract_code(text) == code


# -- the sandbox --------------------------------------------------------------------------
def test_passing_and_failing_tests_are_counted():
    code = "def add(a, b):\n    return a + b\n"
    result = run_python(code, ["assert add(1, 2) == 3", "assert add(1, 1) == 3"])
    assert (result.status, result.passed, result.score) == ("ok", (True, False), 0.5)
    assert run_python(code, ["assert add(2, 2) == 4"]).score == 1.0
    assert run_python(code, ["assert add(2, 2) == 5"]).score == 0.0


def test_code_reward_runs_the_fenced_code_against_the_row_s_tests():
    answer = "Sure:\n```python\ndef square(x):\n    return x * x\n```\nIt multiplies."
    tests = ["assert square(3) == 9", "assert square(-2) == 4", "assert square(0) == 1"]
    assert code_reward({"answer": answer, "tests": tests}) == pytest.approx(2 / 3)
    one_block = "assert square(3) == 9\nassert square(0) == 1"  # a string: one test
    assert code_reward({"answer": answer, "tests": one_block}) == 0.0
    assert code_reward({"answer": answer, "checks": "assert square(3) == 9"}, key="checks") == 1.0


@pytest.mark.parametrize(
    ("tests", "words"),
    [([], "non-empty list"), ([1], "non-empty list"), (None, "non-empty list"),
     ("missing", r"no 'tests' column")],
)  # fmt: skip
def test_code_reward_wants_tests(tests, words):
    row = {"answer": "x = 1"} if tests == "missing" else {"answer": "x = 1", "tests": tests}
    with pytest.raises(DataError, match=words):
        code_reward(row)


def test_a_syntax_error_or_an_exception_in_the_code_is_an_error():
    result = run_python("def f(:\n", ["assert True"])
    assert (result.status, result.score) == ("error", 0.0)
    assert result.error.startswith("SyntaxError")
    assert run_python("raise ValueError('no')", ["assert True"]).error == "ValueError: no"
    assert run_python("x = input()", ["assert True"]).error.startswith("EOFError")  # no hang


def test_an_infinite_loop_times_out():
    result = run_python("while True:\n    pass\n", ["assert True"], timeout=1.0)
    assert (result.status, result.score) == ("timeout", 0.0)
    assert 1.0 <= result.seconds < 1.0 + SLACK


def test_an_output_flood_is_cut_off_without_filling_memory():
    start = time.monotonic()
    result = run_python("while True:\n    print('x' * 10000)\n", ["assert True"], timeout=30)
    assert (result.status, result.score) == ("output_limit", 0.0)
    assert time.monotonic() - start < 10  # stopped by the cap, long before the timeout
    assert len(result.output) <= OUTPUT_LIMIT and result.output.startswith("xxx")


def test_memory_beyond_the_limit_is_a_memory_error():
    result = run_python("x = bytearray(1 << 30)\n", ["assert True"], memory_mb=256)
    assert (result.status, result.error, result.score) == ("error", "MemoryError: ", 0.0)
    # The limit is the cause: 1 GiB of address space, never touched, fits under 4 GiB.
    reserve = "import mmap\nm = mmap.mmap(-1, 1 << 30)\n"
    assert run_python(reserve, ["assert len(m) == 1 << 30"], memory_mb=4096).score == 1.0
    assert "Cannot allocate memory" in run_python(reserve, [], memory_mb=256).error


def test_the_network_is_blocked():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        code = f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n"
        result = run_python(code, ["assert True"])
        assert result.status == "error" and result.error.startswith("PermissionError")
        assert "network access" in result.error
        result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}))", [])
        assert result.error.startswith("PermissionError")
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected


def test_a_network_namespace_blocks_connections_below_python():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        raw_connect = (
            "import ctypes, struct\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "fd = libc.socket(2, 1, 0)\n"  # AF_INET, SOCK_STREAM
            f"addr = struct.pack('=H', 2) + struct.pack('>H', {port}) + bytes([127, 0, 0, 1])"
            " + bytes(8)\n"
            "connected = libc.connect(fd, addr, 16) == 0\n"
        )
        result = run_python(raw_connect, ["assert not connected"])
        if not result.network_namespace:
            pytest.skip("no permission for a network namespace here: the Python-level block only")
        assert result.score == 1.0, result
        with pytest.raises(BlockingIOError):
            server.accept()


@pytest.mark.parametrize(
    "code",
    [
        "import os\nos._exit(0)\n",  # exit code 0 before the tests ran
        "import os\ndef f():\n    os._exit(0)\n",  # exit code 0 in the middle of them
        "open('result.json', 'w').write('{\"token\": \"guess\", \"passed\": [true]}')\n"
        "import os\nos._exit(0)\n",  # a forged report
    ],
)
def test_exiting_early_is_not_a_pass(code):
    result = run_python(code, ["f()" if "def f" in code else "assert True", "assert True"])
    assert (result.status, result.returncode, result.score) == ("crashed", 0, 0.0)


def test_sys_exit_is_an_error_and_a_test_that_exits_fails():
    assert run_python("import sys\nsys.exit(0)\n", ["assert True"]).error == "SystemExit: 0"
    result = run_python("import sys\ndef f():\n    sys.exit(0)\n", ["f()", "assert True"])
    assert (result.status, result.passed) == ("ok", (False, True))


def test_a_segfault_crashes_the_child_only():
    result = run_python("import ctypes\nctypes.string_at(0)\n", ["assert True"])
    assert (result.status, result.returncode, result.score) == ("crashed", -11, 0.0)


def test_closed_streams_do_not_lose_the_report():
    result = run_python("import os\nos.close(1)\nos.close(2)\n", ["assert True"])
    assert result.score == 1.0


def test_the_child_is_a_fresh_interpreter():
    assert threading.active_count() >= 1 and "torch" in sys.modules  # the caller's state
    tests = [
        "import sys\nassert 'torch' not in sys.modules",
        "import threading\nassert threading.active_count() == 1",
        "import os\nassert os.environ['CUDA_VISIBLE_DEVICES'] == ''",
        "import os, sys\nassert os.getcwd() not in sys.path and 'flowgraph-sandbox' in os.getcwd()",
    ]
    assert run_python("x = 1", tests).passed == (True, True, True, True)


def test_processes_and_foreign_signals_are_refused():
    for code in ("import os\nwhile True:\n    os.fork()\n",  # a fork bomb
                 "import subprocess\nsubprocess.run(['true'])\n",
                 "import multiprocessing as mp\nmp.Process(target=print).start()\n",
                 "import os\nos.system('true')\n",
                 "import os\nos.kill(os.getppid(), 0)\n"):  # fmt: skip
        result = run_python(code, ["assert True"])
        assert result.status == "error" and result.error.startswith("PermissionError"), code


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_descendants_forked_below_python_die_with_the_child(tmp_path):
    pids = tmp_path / "pids"
    code = (
        "import ctypes, os, time\n"
        "for _ in range(3):\n"
        "    ctypes.CDLL(None).fork()\n"  # past the Python-level block: 8 processes
        f"with open({str(pids)!r}, 'a') as f:\n"
        "    f.write(f'{os.getpid()}\\n')\n"
        "time.sleep(60)\n"
    )
    result = run_python(code, ["assert True"], timeout=2.0)
    assert result.status == "timeout" and result.seconds < 2.0 + SLACK
    found = [int(line) for line in pids.read_text().split()]
    assert len(found) == 8
    deadline = time.monotonic() + 5
    while {_state(p) for p in found} - {"gone", "Z"} and time.monotonic() < deadline:
        time.sleep(0.05)  # SIGKILL is delivered asynchronously
    assert {_state(p) for p in found} <= {"gone", "Z"}


def test_bad_limits_are_config_errors():
    with pytest.raises(ConfigError, match="sandbox timeout: a positive number of seconds"):
        run_python("", [], timeout=0)
    with pytest.raises(ConfigError, match="sandbox memory_mb: a whole number of MiB, at least 64"):
        code_reward({"answer": "", "tests": "assert True"}, memory_mb=8)


def test_the_sandbox_result_statuses_are_documented():
    for status in sandbox.STATUSES:
        assert f"``{status}``" in sandbox.SandboxResult.__doc__


# -- the registry -------------------------------------------------------------------------
def test_registry_names_and_options():
    assert set(REWARDS) == {"math", "format", "code"}
    assert reward_function("format") is format_reward
    assert reward_function("flowgraph.rl.rewards:math_reward") is math_reward
    quick = reward_function("code", timeout=1.0)
    assert quick.keywords == {"timeout": 1.0} and quick.func is code_reward
    assert reward_function(len) is len


def test_a_user_reward_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(row):\n    return 1.0 / (1 + len(row['answer']))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = reward_function("my_rewards:brevity")
    assert score_rows(fn, [{"answer": ""}, {"answer": "abc"}]) == [1.0, 0.25]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("maht", "unknown reward 'maht'; did you mean 'math'\\? rewards: code, format, math"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz' \\(ModuleNotFoundError"),
        ("flowgraph.rl.rewards:math_rewrd", "has no 'math_rewrd'; did you mean 'math_reward'"),
        ("flowgraph.rl.math_answers:REL_TOL", "is a Fraction, not a function"),
        ("json:", "expected 'package.module:function'"),
        (3, "a reward is a name or 'package.module:function', got 3"),
    ],
)
def test_registry_errors(spec, words):
    with pytest.raises(ConfigError, match=words):
        reward_function(spec)


def test_registry_errors_for_a_broken_module_and_bad_options(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("def f(row):\n    return 1.0\n1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="cannot import 'broken_rewards' \\(ZeroDivisionError"):
        reward_function("broken_rewards:f")
    with pytest.raises(ConfigError, match="options {'timout': 1} do not fit it"):
        reward_function("code", timout=1)


# -- score_rows ---------------------------------------------------------------------------
def answer_length(row):
    return len(row["answer"])


def fails_on_bad_rows(row):
    if row["answer"] == "bad":
        raise KeyError("solution")
    return 1.0


def worker_pid(row):
    return os.getpid()


def returns(row):
    return row["value"]


ROWS = [{"prompt": f"q{i}", "answer": "x" * i, "solution": str(i)} for i in range(12)]


def test_score_rows_in_workers_equals_in_process():
    rows = ROWS + [{"prompt": "m", "answer": "\\boxed{12}", "solution": "#### 12"}]
    for fn in (answer_length, math_reward):
        assert score_rows(fn, rows, workers=2) == score_rows(fn, rows, workers=0)
    assert score_rows(answer_length, ROWS, workers=2) == [float(i) for i in range(12)]
    assert score_rows(answer_length, [], workers=2) == []


def test_the_pool_is_kept_across_calls():
    first = set(score_rows(worker_pid, ROWS * 4, workers=2))
    second = set(score_rows(worker_pid, ROWS * 4, workers=2))
    assert os.getpid() not in first
    assert len(first | second) <= 2  # the same two processes, not new ones per call


@pytest.mark.parametrize("workers", [0, 2])
def test_a_reward_that_raises_names_itself_and_the_row(workers):
    rows = [{"prompt": "a", "answer": "ok"}, {"prompt": "b", "answer": "ok"},
            {"prompt": "the bad one", "answer": "bad"}]  # fmt: skip
    with pytest.raises(RewardError) as info:
        score_rows(fails_on_bad_rows, rows, workers=workers)
    message = str(info.value)
    assert message.startswith(
        "reward test_rewards:fails_on_bad_rows raised on row 2 (prompt 'the bad one'): "
        "KeyError: 'solution'"
    ), message
    if workers:
        assert "in the worker process" in message and "raise KeyError" in message
    else:
        assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize(
    ("value", "words"),
    [("1.0", "returned '1.0' \\(str\\) for row 0; a reward returns a float"),
     (None, "returned None \\(NoneType\\)"), ([1.0], "returned \\[1.0\\] \\(list\\)"),
     (math.nan, "returned nan for row 0; rewards are finite"),
     (torch.ones(2), "returned tensor")],
)  # fmt: skip
def test_a_reward_must_return_a_finite_number(value, words):
    with pytest.raises(RewardError, match=words):
        score_rows(returns, [{"value": value}])


def test_a_missing_column_is_named_with_the_row():
    with pytest.raises(RewardError, match="math_reward raised on row 1 .*DataError: math_reward: "
                       "the row has no 'solution' column"):  # fmt: skip
        score_rows(math_reward, [ROWS[0], {"prompt": "q", "answer": "1"}])


def test_numbers_of_other_types_are_floats():
    values = [True, 2, torch.tensor(0.5), torch.tensor([1.5])]
    scores = score_rows(returns, [{"value": v} for v in values])
    assert scores == [1.0, 2.0, 0.5, 1.5] and all(type(s) is float for s in scores)


def test_a_reward_that_cannot_pickle_says_so():
    with pytest.raises(RewardError, match="cannot be sent to worker processes.*module-level"):
        score_rows(lambda row: 1.0, ROWS, workers=2)
    with pytest.raises(ConfigError, match="workers must be a whole number >= 0"):
        score_rows(answer_length, ROWS, workers=-1)


def dies_in_a_worker(row):
    if row["answer"] == "die":
        os._exit(1)
    return 1.0


@pytest.mark.slow  # starts a worker twice
def test_a_worker_that_dies_is_an_error_and_the_pool_restarts():
    with pytest.raises(RewardError, match="a worker process died while scoring with reward "
                       "test_rewards:dies_in_a_worker"):  # fmt: skip
        score_rows(dies_in_a_worker, [{"answer": "ok"}, {"answer": "die"}], workers=1)
    assert score_rows(dies_in_a_worker, [{"answer": "ok"}] * 3, workers=1) == [1.0] * 3


def reward_module(args):
    from flowgraph.config import Config
    from flowgraph.rl.modules import RewardInference

    module = RewardInference("reward")
    module.config = Config(runtime={"response_length": 4}, models={"reward": {"args": args}})
    module.setup()
    return module


def test_the_reward_module_scores_rows_with_a_verifiable_reward():
    module = reward_module({"reward": "math", "reward_options": {"key": "target"}})
    data = {"prompt": ["1+1", "2+2"], "answer": ["2", "5"], "target": ["2", "4"],
            "response_mask": torch.ones(2, 4)}  # fmt: skip
    assert module.eval_step(data)["score"].tolist() == [1.0, 0.0]
    workers = reward_module({"reward": "math", "reward_options": {"key": "target"},
                             "reward_workers": 2})  # fmt: skip
    assert workers.eval_step(data)["score"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({"reward": "maht"}, r"models.reward.args.reward: unknown reward 'maht'; did you mean"),
        ({"reward": "math", "reward_options": [1]}, r"reward_options: a mapping of keyword"),
        ({"reward": "math", "reward_options": {"colour": 1}}, r"args.reward: reward .* options"),
        ({"reward": "math", "reward_workers": -1}, r"reward_workers: must be 0 or more"),
    ],
)
def test_reward_module_settings_name_the_fix(args, words):
    with pytest.raises(ConfigError, match=words):
        reward_module(args)


@pytest.mark.parametrize(
    ("predicted", "reference", "equal"),
    [("1 2", "12", False), ("1 1/2", "5.5", False), ("2x", "2", False), ("3n", "3", False),
     ("5 cm", "5", True), ("3 / 4", "0.75", True), ("- 3", "-3", True), ("1 000", "1000", True)],
)  # fmt: skip
def test_spaces_and_letters_do_not_make_other_numbers_equal(predicted, reference, equal):
    assert math_equal(predicted, reference) is equal

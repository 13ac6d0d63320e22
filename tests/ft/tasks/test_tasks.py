"""trace_ft.tasks: the built-in suite and the TRACE-benchmark loader."""

import json

import pytest

from trace_ft.tasks import (BASE, BASE_OPS, SKILLS, Example, Task, TaskFormatError, builtin_suite,
                            builtin_task, load_task_dir, read_examples, resolve_tasks)


def test_builtin_suite_is_seeded_distinct_and_correct():
    a = builtin_suite(seed=3, n_train=300, n_test=50)
    b = builtin_suite(seed=3, n_train=300, n_test=50)
    assert [t.train for t in a] == [t.train for t in b]
    assert builtin_task("rev", seed=4, n_train=300).train != a[0].train
    for t in a:
        assert not {e.prompt for e in t.test} & {e.prompt for e in t.train}
        assert len({e.prompt for e in t.train}) == len(t.train)
    # spot-check every skill's answers against a direct computation
    for e in builtin_task("rev", n_train=50).train:
        assert e.answer == e.prompt[4:-1][::-1]
    for e in builtin_task("sort", n_train=50).train:
        assert e.answer == "".join(sorted(e.prompt[5:-1]))
    for e in builtin_task("add", n_train=50).train:
        x, y = e.prompt[4:-1].split("+")
        assert int(e.answer) == int(x) + int(y)
    for e in builtin_task("count", n_train=50).train:
        c, s = e.prompt[4:-1].split("|")
        assert int(e.answer) == s.count(c)
    assert len(SKILLS) >= 5
    base = builtin_task(BASE, n_train=500)
    assert len({e.prompt.split(":")[0] for e in base.train}) == len(BASE_OPS)   # a broad mixture


def test_small_spaces_do_not_hang():
    # "inc" has only 999 distinct prompts; the base mixture still fills a large set
    assert len(builtin_task(BASE, n_train=5000, n_test=10).train) == 5000


def test_scorers():
    t = Task("t", [Example("a", "b")], [Example("p", "42"), Example("q", "7")])
    assert t.score(["42", " 7 "]) == 100.0
    assert t.score(["42", "8"]) == 50.0
    with pytest.raises(ValueError, match="1 predictions for 2 examples"):
        t.score(["1"])
    lab = Task("c", [Example("a", "pos")], [Example("x", "pos")], scorer="label")
    assert lab.score(["pos because"]) == 100.0
    with pytest.raises(ValueError, match="scorer"):
        Task("x", [Example("a", "b")], [Example("a", "b")], scorer="bleu")


def _write(path, text):
    path.write_text(text)
    return path


def test_loader_reads_json_arrays_and_jsonl(tmp_path):
    d = tmp_path / "task_a"
    d.mkdir()
    _write(d / "train.json", json.dumps([{"prompt": "1+1=", "answer": "2"},
                                         {"prompt": "2+2=", "answer": "4"}], indent=2))
    _write(d / "test.jsonl", '{"input": "3+3=", "output": "6"}\n\n{"input": "1+0=", "output": "1"}\n')
    task = load_task_dir(d)
    assert task.name == "task_a"
    assert task.train == [Example("1+1=", "2"), Example("2+2=", "4")]
    assert task.test == [Example("3+3=", "6"), Example("1+0=", "1")]
    assert resolve_tasks([str(d), "rev"], n_train=20, n_test=5)[1].name == "rev"


@pytest.mark.parametrize("name,text,line,needle", [
    ("train.jsonl", '{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n', 2, "no 'answer'"),
    ("train.jsonl", '{"prompt": "a", "answer": "b"}\n{"prompt": "a", \n', 2, "invalid JSON"),
    ("train.jsonl", '{"prompt": "a", "answer": 3}\n', 1, "'answer' must be a string"),
    ("train.json", '[\n {"prompt": "a", "answer": "b"},\n {"question": "a"}\n]\n', 3, "neither"),
    ("train.json", '[\n {"prompt": "a", "answer": "b"},\n ["a", "b"]\n]\n', 3, "expected an object"),
    ("train.json", '[\n {"prompt": "a", "answer": "b"},\n {"prompt": "a" "answer": "b"}\n]\n', 3,
     "invalid JSON"),
    ("train.json", '[\n {"prompt": "a", "answer": "b"}\n', 3, "unterminated"),
])
def test_loader_names_file_and_line_of_a_malformed_record(tmp_path, name, text, line, needle):
    p = _write(tmp_path / name, text)
    with pytest.raises(TaskFormatError) as e:
        read_examples(p)
    assert f"{p}:{line}:" in str(e.value) and needle in str(e.value)


def test_loader_missing_files_and_empty(tmp_path):
    with pytest.raises(TaskFormatError, match="does not exist"):
        load_task_dir(tmp_path / "nope")
    d = tmp_path / "t"
    d.mkdir()
    _write(d / "train.json", '[{"prompt": "a", "answer": "b"}]')
    with pytest.raises(TaskFormatError, match="no test.json or test.jsonl"):
        load_task_dir(d)
    _write(d / "test.json", "[]")
    with pytest.raises(TaskFormatError, match="no records"):
        load_task_dir(d)
    with pytest.raises(ValueError, match="neither a built-in task"):
        resolve_tasks(["not_a_task"])


def test_the_formats_suite_adapts_base_skills():
    from trace_ft.tasks import FORMATS, SUITES, resolve_tasks

    assert SUITES["formats"] == tuple(FORMATS)
    tasks = {t.name: t for t in resolve_tasks(SUITES["formats"], seed=1, n_train=200, n_test=40)}
    for t in tasks.values():  # no test prompt in train
        assert not {e.prompt for e in t.test} & {e.prompt for e in t.train}
    e = tasks["upnx"].train[0]
    word = e.prompt[len("upnx:"):-1]
    assert e.answer == "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in word).upper()
    assert all(e.answer == " ".join(e.prompt[4:-1]) for e in tasks["spc"].test)
    assert all(e.answer in ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
               for e in tasks["lenw"].test)


def test_json_lines_keep_unicode_line_separators_inside_strings(tmp_path):
    from trace_ft.tasks import read_examples

    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "one\u2028two", "answer": "x\u0085y"}\n{"input": "3\u2029", "output": "4"}\r\n',
                    encoding="utf-8")
    assert read_examples(path) == [Example("one\u2028two", "x\u0085y"), Example("3\u2029", "4")]

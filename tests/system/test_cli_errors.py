"""The command line as a user meets it: one-line errors, exit code 2, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ENTRY_POINTS = {
    "sami_mlx.train": [sys.executable, "-m", "sami_mlx.train"],
    "sami-mlx train": [sys.executable, "-m", "sami_mlx", "train"],
}
FLAGS = [
    "--model",
    "--constitution",
    "--queries",
    "--template",
    "--variants",
    "--iterations",
    "--schedule",
    "--steps",
    "--queries-per-step",
    "--learning-rate",
    "--lora-rank",
    "--temperature",
    "--max-tokens",
    "--seed",
    "--out",
]


def run_cli(entry: str, args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ENTRY_POINTS[entry] + args,
        cwd=cwd,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class Case:
    """A bad input: files to write, flags that differ from a valid run, and what the error names."""

    id: str
    files: dict[str, str | bytes] = field(default_factory=dict)
    flags: dict[str, str] = field(default_factory=dict)
    names: tuple[str, ...] = ()  # substrings the error line must hold; {tmp} is the case's folder
    config: str | None = None  # text of a -c YAML config


def bad_file(id: str, flag_and_file: str, content: str | bytes, *names: str) -> Case:
    """`--flag FILE`, the file holding `content`: the error names the file and each of `names`."""
    flag, name = flag_and_file.split()
    return Case(id, files={name: content}, flags={flag: f"{{tmp}}/{name}"}, names=(f"{{tmp}}/{name}", *names))


CASES = [
    Case("constitution-missing", flags={"--constitution": "{tmp}/nope.yaml"}, names=("{tmp}/nope.yaml", "not found")),
    bad_file("constitution-bad-json", "--constitution c.json", '{"name": "x", "principles": [\n', "invalid JSON"),
    bad_file(
        "constitution-bad-yaml",
        "--constitution c.yaml",
        "name: x\nprinciples:\n  - {name: a, positive: [\n",
        "invalid YAML",
    ),
    bad_file("constitution-not-mapping", "--constitution c.yaml", "- be kind\n- be brief\n", "mapping"),
    bad_file("constitution-no-principles", "--constitution c.yaml", "name: x\n", "principles"),
    bad_file(
        "constitution-empty-wording",
        "--constitution c.yaml",
        "principles:\n  - {name: a, positive: Be kind., negative: ''}\n",
        "principle 1 (a): field 'negative' is empty",
    ),
    bad_file(
        "constitution-duplicate-names",
        "--constitution c.yaml",
        "principles:\n  - {name: brief, positive: Be brief., negative: Be long.}\n"
        "  - {name: brief, positive: Be kind., negative: Be rude.}\n",
        "principle 2 (brief): the name is taken by principle 1",
        "brief",
    ),
    bad_file(
        "constitution-not-utf8", "--constitution c.yaml", "name: caf\xe9\nprinciples: []\n".encode("latin-1"), "UTF-8"
    ),
    Case("queries-missing", flags={"--queries": "{tmp}/nope.jsonl"}, names=("{tmp}/nope.jsonl", "not found")),
    bad_file("queries-empty", "--queries q.txt", "\n\n", "no queries"),
    bad_file("queries-bad-jsonl-line", "--queries q.jsonl", '{"query": "a"}\n{"query": "b"\n', "line 2"),
    bad_file("template-without-query", "--template t.txt", "Principles:\n{constitution}\n\nAnswer:", "{query}"),
    bad_file(
        "template-typo-placeholder",
        "--template t.txt",
        "Principles:\n{constitution}\n\nHuman: {query}\n({qeury})\nAssistant:",
        "unknown placeholder {qeury}",
        "did you mean {query}",
        "{{",
    ),
    bad_file(
        "generation-template-unknown-placeholder",
        "--generation-template g.txt",
        "{constitution}\n{query}\n{foo}",
        "unknown placeholder {foo}",
        "{constitution}, {query}",
    ),
    Case("sentence-end-unknown", flags={"--sentence-end": "first"}, names=("--sentence-end 'first'", "positive")),
    Case(
        "anchor-template-without-query",
        files={"a.txt": "Human: hello\n\nAssistant:"},
        flags={"--anchor-beta": "1.0", "--anchor-template": "{tmp}/a.txt"},
        names=("{tmp}/a.txt", "{query}"),
    ),
    Case(
        "anchor-template-without-beta",
        files={"a.txt": "Human: {query}\n\nAssistant:"},
        flags={"--anchor-template": "{tmp}/a.txt", "--anchor-beta": "0"},
        names=("--anchor-template", "--anchor-beta"),
    ),
    Case("anchor-beta-negative", flags={"--anchor-beta": "-1"}, names=("--anchor-beta -1",)),
    Case("variants-more-than-exist", flags={"--variants": "9"}, names=("--variants 9", "at most 4")),
    Case("variants-one", flags={"--variants": "1"}, names=("--variants 1",)),
    Case("steps-zero", flags={"--steps": "0"}, names=("--steps 0",)),
    Case("learning-rate-negative", flags={"--learning-rate": "-1"}, names=("--learning-rate",)),
    Case("model-dir-missing", flags={"--model": "{tmp}/no-model"}, names=("--model", "{tmp}/no-model")),
    Case(
        "model-dir-without-config",
        files={"empty-model/README": "x"},
        flags={"--model": "{tmp}/empty-model"},
        names=("--model", "{tmp}/empty-model", "config.json"),
    ),
    Case("config-unknown-key", config="steps: 2\nlearning_rat: 0.001\n", names=("{tmp}/config.yaml", "learning_rat")),
]


def materialise(case: Case, tmp: Path, tiny_flags) -> list[str]:
    """Write the case's files next to a valid constitution and queries; return the argv."""
    valid = tiny_flags(root=tmp, iterations=1, steps=1, max_tokens=4)  # out: tmp/run
    for name, content in case.files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    flags = dict(zip(valid[::2], valid[1::2]))
    flags.update({k: v.replace("{tmp}", str(tmp)) for k, v in case.flags.items()})
    argv = [x for kv in flags.items() for x in kv]
    if case.config is not None:
        (tmp / "config.yaml").write_text(case.config)
        argv = ["-c", str(tmp / "config.yaml"), *argv]
    return argv


def assert_one_line_error(proc: subprocess.CompletedProcess, names: list[str]) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for name in names:
        assert name in lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, tiny_flags):
    # Alternate the two entry points across the table so both meet every kind of mistake.
    entry = list(ENTRY_POINTS)[CASES.index(case) % 2]
    argv = materialise(case, tmp_path, tiny_flags)
    proc = run_cli(entry, argv, tmp_path)
    assert_one_line_error(proc, [n.replace("{tmp}", str(tmp_path)) for n in case.names])
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "runs").exists()


def test_bad_input_leaves_run_directory_untouched(tmp_path, tiny_flags):
    run_dir = tmp_path / "existing-run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_bytes(b"keep me\x00\xff")
    (run_dir / "config.yaml").write_text("steps: 3\n")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    case = Case("bad", files={"c.yaml": "name: x\n"}, flags={"--constitution": "{tmp}/c.yaml"})
    argv = materialise(case, tmp_path, tiny_flags) + ["--out", str(run_dir)]
    proc = run_cli("sami_mlx.train", argv, tmp_path)
    assert_one_line_error(proc, [str(tmp_path / "c.yaml")])
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_dry_run_prints_resolved_config(entry, tmp_path, tiny_model, tiny_flags):
    argv = materialise(Case("ok"), tmp_path, tiny_flags)
    (tmp_path / "config.yaml").write_text("learning_rate: 0.01\nlora-rank: 4\nseed: 3\n")
    argv = ["-c", str(tmp_path / "config.yaml"), *argv, "--learning-rate", "0.002", "--seed", "11", "--dry-run"]
    proc = run_cli(entry, argv, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "learning_rate: 0.002" in proc.stdout
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["learning_rate"] == 0.002  # the flag beat the file
    assert cfg["seed"] == 11
    assert cfg["lora_rank"] == 4  # the file beat the default
    assert cfg["model"] == str(tiny_model)
    assert cfg["generation_template"] == cfg["training_template"] == "dialogue"
    assert "8 queries, 2 principles, 4 variants per query" in proc.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_help_lists_the_flags(entry, tmp_path):
    proc = run_cli(entry, ["--help"], tmp_path)
    assert proc.returncode == 0
    for flag in FLAGS:
        assert flag in proc.stdout, flag


def test_in_process_main_returns_2_with_one_line(tmp_path, tiny_flags, capsys):
    from sami_mlx.cli import main as cli
    from sami_mlx.cli import train

    argv = materialise(CASES[0], tmp_path, tiny_flags)
    assert train.main(argv) == 2
    assert cli.main(["train", *argv]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert all(line.startswith("error: ") and "nope.yaml" in line for line in err)


# Ctrl-C: one line saying what was not written, or how to go on; exit code 130.
INTERRUPTED = {
    "eval": ("--run r --queries q.txt", "sami_mlx.evaluation.run_setup.load_run_setup", "no results written"),
    "write": ("--task t --writer w --out p.yaml", "sami_mlx.model.load_model", "nothing written"),
    "export": ("r --out o", "sami_mlx.export.find_run_adapters", "nothing written"),
    "train": ("--resume r", "sami_mlx.cli.train.resumed_report_to", "resume with --resume RUN"),
}


@pytest.mark.parametrize("command", list(INTERRUPTED))
def test_ctrl_c_says_what_was_not_written_or_how_to_go_on(command, tmp_path, monkeypatch, capsys):
    from sami_mlx.cli import main as cli

    flags, where, said = INTERRUPTED[command]

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(where, interrupt)
    monkeypatch.chdir(tmp_path)
    assert cli.main([command, *flags.split()]) == 130
    assert capsys.readouterr().err.strip() == f"interrupted; {said}"

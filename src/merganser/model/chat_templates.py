"""A recipe's ``chat_template``: a named template, ``auto`` (the inputs' most common one) or
inline Jinja, as mergekit 0.1.5 reads the field. The output gets it in ``chat_template.jinja``
and wherever the copied tokenizer files carry a template.

The named templates are written here from each format's published layout. chatml and mistral
render exactly as mergekit's bundled files do; for alpaca, llama3 and exaone mergekit's files
render stray whitespace, and these render the formats themselves (docs/methods.md lists the
differences).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from merganser.errors import RecipeError, did_you_mean
from merganser.storage import safejson
from merganser.storage.inputs import read_text

NAMED = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
        "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
    "alpaca": (
        "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{% set parts = namespace(text=(system | last).content | trim if system else '') %}"
        "{% for message in messages if message['role'] != 'system' %}"
        "{% set head = {'user': 'Instruction', 'assistant': 'Response', "
        "'user_context': 'Input'}.get(message['role']) %}"
        "{% if head %}{% set parts.text = parts.text + ('\\n\\n' if parts.text else '') + "
        "'### ' + head + ':\\n' + message['content'] | trim %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
        "{% set parts.text = parts.text + ('\\n\\n' if parts.text else '') + '### Response:\\n' %}"
        "{% endif %}{{ parts.text }}"
    ),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}"
        "{% endif %}{{ bos_token }}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('After the optional system message, conversation roles must "
        "alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{% if loop.first and system_message is defined %}"
        "{{ ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the "
        "exception of an initial optional system message!') }}{% endif %}{% endfor %}"
    ),
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}"
        "{% endif %}{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}

TEXT_LIMIT = 64 << 20  # tokenizer_config.json lists added tokens; some list many thousands


def template_of(folder: Path) -> str | None:
    """The chat template a model folder carries (``chat_template.jinja``, then
    ``tokenizer_config.json``'s, then a processor's ``chat_template.json``), stripped; None
    if it has none. A named list of templates gives its ``default`` entry, as mergekit takes.
    """
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return read_text(jinja, "chat template", TEXT_LIMIT, RecipeError).strip() or None
    for name in ("tokenizer_config.json", "chat_template.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = safejson.loads(read_text(path, name, TEXT_LIMIT, RecipeError))
        except ValueError as e:
            raise RecipeError(f"{path}: {e}") from None
        found = _template_field(data.get("chat_template") if isinstance(data, dict) else None)
        if found:
            return found
    return None


def _template_field(value: Any) -> str | None:
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in value if isinstance(d, dict)}
        value = named.get("default")
    return value.strip() or None if isinstance(value, str) else None


def resolve(spec: str, folders: list[Path], where: str) -> tuple[str | None, str]:
    """The template a recipe's ``chat_template`` asks for, and a few words on where it came
    from. ``auto`` with no template among the inputs gives None.
    """
    if spec == "auto":
        found = [t for t in (template_of(f) for f in folders) if t]
        if not found:
            return None, "auto: no input model has a chat template"
        chosen, count = Counter(found).most_common(1)[0]
        return chosen, f"auto: the template of {count} of {len(folders)} input models"
    if "{" not in spec and "\n" not in spec:
        if spec in NAMED:
            return NAMED[spec], f"named template {spec!r}"
        known = ", ".join(sorted(NAMED))
        raise RecipeError(
            f"{where}: unknown template name {spec!r}{did_you_mean(spec, NAMED)} (known: "
            f"{known}, auto, or a Jinja template)"
        )
    if len(spec) < 20:
        raise RecipeError(f"{where}: {spec!r} is too short to be a Jinja chat template")
    check_syntax(spec, where)
    return spec, "inline Jinja template"


def check_syntax(template: str, where: str) -> None:
    """One line unless the template parses as Jinja (jinja2 comes with transformers)."""
    try:
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return
    try:
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).parse(template)
    except TemplateSyntaxError as e:
        raise RecipeError(f"{where}: invalid Jinja at line {e.lineno}: {e.message}") from None


def write(out: Any, template: str) -> None:
    """The template into an output being written (an AtomicOutput): ``chat_template.jinja``,
    and every copied file that carries one (tokenizer_config.json, a processor's
    chat_template.json), so no loader sees another.
    """
    import json

    out.write_file("chat_template.jinja", template)
    for name in ("tokenizer_config.json", "chat_template.json"):
        path = out.tmp / name
        if not path.is_file():
            continue
        data = safejson.loads(path.read_bytes())
        if isinstance(data, dict) and "chat_template" in data:
            data["chat_template"] = template
            out.write_file(name, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

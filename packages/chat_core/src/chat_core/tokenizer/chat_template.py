"""Renders a model's Jinja chat template the way Hugging Face transformers does."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from chat_core.tokenizer.base import TokenizerError


class _RaisedByTemplate(TokenizerError):
    """What a template's own raise_exception() throws; re-raised with the template's source named."""


def _raise_exception(message: str) -> None:
    raise _RaisedByTemplate(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlock(Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) and renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENVIRONMENT = _environment()


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    # Compiling costs milliseconds; a server renders the same template for every request.
    return _ENVIRONMENT.from_string(template)


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    template_source: str = "<chat template>",
    **kwargs: Any,
) -> str:
    """`template` rendered with `messages`, `add_generation_prompt` and any extra variables.

    `template_source` (a file path or metadata key) only names the template in errors.
    """
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(
            f"chat template from {template_source} is not valid Jinja (line {exc.lineno}): {exc.message}"
        ) from exc
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except _RaisedByTemplate as exc:
        raise TokenizerError(f"chat template from {template_source} refused the messages: {exc}") from exc
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise TokenizerError(
            f"chat template from {template_source} failed to render: {type(exc).__name__}: {exc}"
        ) from exc

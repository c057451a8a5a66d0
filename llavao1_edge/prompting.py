"""Chat prompts through the model's own chat template, in whatever content form it reads.

Templates read a message's content either as a string or as a list of parts (SmolVLM's and Gemma 3's
read only lists). The image goes in as mtmd's marker — as a string's first line, or as a text part of
its own, as llama-server and llama-cpp-python pass it — since mtmd inserts each family's own image
tokens around it. A rendering that loses the marker or the question is an error naming the model,
never a silent wrong prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from .stages import STAGES

# For models not trained on the four stages: say what each stage holds; the runtime also forces
# each opening tag, so the model only has to fill the stage and close it.
FORMAT_INSTRUCTION = (
    "Answer in four stages, in this order, each wrapped in its tags: "
    + "; ".join(f"{s.open_tag}{s.purpose}{s.close_tag}" for s in STAGES) + "."
)
FALLBACK_TEMPLATE = (  # LLaVA-1.5 style, for GGUF files that carry no template
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }}\n"
    "{% else %}ASSISTANT: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CONTENT_FORMS = ("string", "parts")
MEDIA_MARKER = "<__media__>"  # mtmd_default_marker(): where mtmd puts an image (a test holds the two equal)


class TemplateError(ValueError):
    """A chat template that cannot carry the prompt; the message names the model."""


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
    return env.from_string(template)


def render(template: str | None, messages: list[dict], add_generation_prompt: bool, bos: str = "", eos: str = "") -> str:
    """A conversation through a chat template (the LLaVA-1.5 fallback when there is none)."""
    return _compile(template or FALLBACK_TEMPLATE).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos)


def render_user_turn(template: str | None, content, bos: str = "", eos: str = "") -> str:
    """One user message (`content`: a string or a list of parts), ending where the assistant answers."""
    return render(template, [{"role": "user", "content": content}], True, bos, eos)


def user_content(question: str, marker: str | None, form: str):
    """The user message in a content form: the image marker first (as LLaVA-CoT trains), then the question."""
    if form == "string":
        return f"{marker}\n{question}" if marker else question
    return ([{"type": "text", "text": marker}] if marker else []) + [{"type": "text", "text": question}]


class ChatTemplate:
    """A model's chat template, and the content form it reads (found on the first prompt)."""

    def __init__(self, source: str | None, model_name: str, eos: str = ""):
        self.source, self.model_name, self.eos = source, model_name, eos
        self.form: str | None = None  # "string" or "parts", once known

    def user_turn(self, question: str, marker: str | None = None, instruct_format: bool = False,
                  history: Sequence[tuple[str, str]] = ()) -> str:
        """The rendered prompt for one question (image marker included when given), after earlier turns
        (`history`: (role, text) pairs, role "user" or "assistant") when there are any. BOS is not rendered:
        the tokenizer adds it where the vocabulary says so."""
        q = question.strip()
        if instruct_format:
            q = f"{q}\n\n{FORMAT_INSTRUCTION}"
        failures = []
        for form in ([self.form] if self.form else CONTENT_FORMS):
            earlier = [{"role": role, "content": user_content(text, None, form) if role == "user" else
                        (text if form == "string" else [{"type": "text", "text": text}])} for role, text in history]
            messages = [*earlier, {"role": "user", "content": user_content(q, marker, form)}]
            try:
                text = render(self.source, messages, True, "", self.eos)
            except Exception as e:  # a template may refuse a content form (raise_exception) or fail on it
                failures.append(f"{form} content: {type(e).__name__}: {e}")
                continue
            lost = [what for what, part in (("the image marker", marker), ("the question", q))
                    if part and part not in text]
            if not lost:
                self.form = form
                return text
            failures.append(f"{form} content: {' and '.join(lost)} missing from the rendered prompt")
        raise TemplateError(f"{self.model_name}: its chat template cannot carry this prompt ({'; '.join(failures)})")

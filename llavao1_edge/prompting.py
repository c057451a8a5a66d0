"""Chat prompts from the GGUF's own chat template, and the format instruction for other models."""

from __future__ import annotations

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


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
    return env.from_string(template)


def render_user_turn(template: str | None, user_text: str, bos: str = "", eos: str = "") -> str:
    """The prompt for one user message, ending where the assistant starts to answer."""
    return _compile(template or FALLBACK_TEMPLATE).render(
        messages=[{"role": "user", "content": user_text}], add_generation_prompt=True,
        bos_token=bos, eos_token=eos)


def user_text(question: str, marker: str | None, instruct_format: bool) -> str:
    """The user message: image marker first (as LLaVA-CoT trains), then the question."""
    q = question.strip()
    if instruct_format:
        q = f"{q}\n\n{FORMAT_INSTRUCTION}"
    return f"{marker}\n{q}" if marker else q

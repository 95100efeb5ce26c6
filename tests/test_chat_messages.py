"""Bad chat messages and bad `generate` arguments get a ValueError that names the problem (and
the message), before anything is rendered or queued; the server answers them with a 400."""

from __future__ import annotations

import pytest

from lamina import LLM, SamplingParams
from lamina.loading.chat_template import CHAT_ROLES, render_chat_template, validate_messages

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    return LLM(str(folder), dtype="float32", max_model_len=64)


# ---- validate_messages: OpenAI's shape ---------------------------------------------------------
@pytest.mark.parametrize(
    ("messages", "match"),
    [
        (None, r"messages must be a list .* got NoneType"),
        ("hello", r"messages must be a list .* got str"),
        ([], r"messages is empty"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] is a str, not a dict"),
        ([{"content": "a"}], r"messages\[0\] has no 'role'; accepted roles: system, developer"),
        ([{"role": "bot", "content": "a"}], r"messages\[0\] has role 'bot'; accepted roles"),
        ([{"role": "user"}], r"messages\[0\] \(user\) has no 'content'"),
        ([{"role": "user", "content": None}], r"messages\[0\] \(user\) has no 'content'"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant"}],
            r"messages\[1\] \(assistant\) has no 'content' \(an assistant message may omit it "
            r"only with 'tool_calls'\)",
        ),
        ([{"role": "user", "content": 3}], r"messages\[0\] \(user\): content must be a string"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            r"messages\[0\] \(user\): content\[0\] is not a text part",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}],
            r"content\[1\] is not a text part",
        ),
    ],
)
def test_bad_messages_are_named(messages, match):
    with pytest.raises(ValueError, match=match):
        validate_messages(messages)


def test_good_messages_pass():
    validate_messages(
        [
            {"role": role, "content": f"{role} text"}
            for role in ("system", "developer", "user", "assistant", "tool")
        ]
    )
    validate_messages([{"role": "user", "content": [{"type": "text", "text": "a"}, {"text": "b"}]}])
    validate_messages([{"role": "user", "content": ""}])
    tool_call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    validate_messages(
        [
            {"role": "user", "content": "call f"},
            {"role": "assistant", "content": None, "tool_calls": [tool_call]},
            {"role": "tool", "content": "42", "tool_call_id": "1"},
        ]
    )
    assert CHAT_ROLES == ("system", "developer", "user", "assistant", "tool")


# ---- the tokenizer: structure only, and a clear error for a missing content -------------------
def test_render_checks_structure_and_names_a_missing_content():
    kwargs = {"add_generation_prompt": False, "special_tokens": {}}
    with pytest.raises(ValueError, match=r"messages\[0\] is a str"):
        render_chat_template(TEMPLATE, ["hi"], **kwargs)  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"messages\[1\] has no 'role'"):
        render_chat_template(
            TEMPLATE, [{"role": "user", "content": "a"}, {"content": "b"}], **kwargs
        )
    strict = "{{ messages[0]['role'] + messages[0]['content'] }}"  # as SmolLM2's template
    with pytest.raises(ValueError, match=r"messages\[0\] \(user\) has no 'content'"):
        render_chat_template(strict, [{"role": "user"}], **kwargs)
    # roles a template understands beyond OpenAI's pass through, as in transformers
    assert render_chat_template(TEMPLATE, [{"role": "ipython", "content": "x"}], **kwargs) == (
        "ipython: x\n"
    )


def test_tokenizer_names_a_missing_content(tiny_llm):
    """SmolLM2's template concatenates the content, which jinja2 refuses when it is missing
    ("'dict object' has no attribute 'content'")."""
    concat = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match=r"messages\[1\] \(user\) has no 'content'"):
        tiny_llm.tokenizer.apply_chat_template(
            [{"role": "system", "content": "s"}, {"role": "user"}], chat_template=concat
        )


# ---- LLM.chat -----------------------------------------------------------------------------------
def test_chat_validates_before_rendering(tiny_llm):
    with pytest.raises(ValueError, match=r"messages\[0\] \(user\) has no 'content'"):
        tiny_llm.chat([{"role": "user"}], use_tqdm=False)
    with pytest.raises(ValueError, match=r"messages\[0\] has role 'human'"):
        tiny_llm.chat([{"role": "human", "content": "hi"}], use_tqdm=False)
    batch = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}, {"x": 1}]]
    with pytest.raises(ValueError, match=r"messages\[1\]\[1\] has no 'role'"):
        tiny_llm.chat(batch, use_tqdm=False)
    with pytest.raises(ValueError, match=r"messages is empty"):
        tiny_llm.chat([], use_tqdm=False)
    assert not tiny_llm.engine.has_unfinished_requests()


def test_chat_accepts_text_parts_and_batches(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=2)
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert len(tiny_llm.chat(parts, params, use_tqdm=False)) == 1
    batch = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    assert len(tiny_llm.chat(batch, params, use_tqdm=False)) == 2


# ---- LLM.generate's arguments -------------------------------------------------------------------
def test_generate_refuses_a_dict_of_sampling_params(tiny_llm):
    with pytest.raises(ValueError, match=r"not a dict: use SamplingParams\(max_tokens=2\)"):
        tiny_llm.generate("a", {"max_tokens": 2}, use_tqdm=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"one per prompt; got dict"):
        tiny_llm.generate(["a"], [{"max_tokens": 2}], use_tqdm=False)  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"not int"):
        tiny_llm.generate("a", 3, use_tqdm=False)  # type: ignore[arg-type]
    assert not tiny_llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("prompts", [None, 5, b"bytes"])
def test_generate_refuses_prompts_of_the_wrong_type(tiny_llm, prompts):
    with pytest.raises(ValueError, match=r"prompts must be a string, a list of token ids"):
        tiny_llm.generate(prompts, use_tqdm=False)  # type: ignore[arg-type]


def test_generate_still_takes_every_prompt_form(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=1)
    forms = ["a", [5, 6], {"prompt": "b"}, {"prompt_token_ids": [7]}]
    assert len(tiny_llm.generate(forms, params, use_tqdm=False)) == 4
    assert len(tiny_llm.generate(tuple(forms), [params] * 4, use_tqdm=False)) == 4
    assert len(tiny_llm.generate([5, 6], params, use_tqdm=False)) == 1
    assert tiny_llm.generate([], params, use_tqdm=False) == []

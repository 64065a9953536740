"""Chat templates: the GGUF's Jinja template, the family fallbacks, BOS handling, bad input."""

from __future__ import annotations

import pytest

from swarm.chat_template import ChatTemplate, normalize_messages
from swarm.errors import InvalidRequestError, UnsupportedModelError
from swarm.gguf_file import GGUFFile
from tests.conftest import load_fixture

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
SMOLLM2_DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


def metadata(architecture: str, *, template: str | None = None, add_bos: bool = True) -> dict:
    values = {
        "general.architecture": architecture,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>"],
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": add_bos,
    }
    if template is not None:
        values["tokenizer.chat_template"] = template
    return values


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]


def test_smollm2_template_renders_chatml_with_its_default_system_turn():
    template = ChatTemplate.from_metadata(
        metadata("llama", template=SMOLLM2_TEMPLATE, add_bos=False) | {"tokenizer.ggml.model": "gpt2"}
    )
    assert template.from_gguf
    assert template.render([{"role": "user", "content": "Hi"}]) == (
        SMOLLM2_DEFAULT_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert template.render(CONVERSATION, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    )


def test_gemma_fallback_folds_system_into_first_user_turn_and_drops_bos():
    template = ChatTemplate.from_metadata(metadata("gemma3"))
    assert template.fallback == "gemma" and not template.from_gguf
    assert template.render(CONVERSATION) == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_bos_text_kept_when_the_tokenizer_does_not_add_bos():
    template = ChatTemplate.from_metadata(metadata("gemma3", add_bos=False))
    assert template.render([{"role": "user", "content": "Hi"}]).startswith("<bos><start_of_turn>user\n")


def test_gguf_template_bos_is_removed_once_when_the_tokenizer_adds_it():
    template = ChatTemplate.from_metadata(metadata("llama", template="{{ bos_token }}{{ bos_token }}x"))
    assert template.render([{"role": "user", "content": "Hi"}]) == "<bos>x"


def test_other_architectures_fall_back_to_chatml():
    template = ChatTemplate.from_metadata(metadata("mistral"))
    assert template.fallback == "chatml"
    assert template.render(CONVERSATION[:2]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_text_parts_are_joined():
    template = ChatTemplate.from_metadata(metadata("mistral"))
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert "<|im_start|>user\none\ntwo<|im_end|>" in template.render([{"role": "user", "content": parts}])


def test_hugging_face_extras():
    source = (
        "{% generation %}{{ messages[0]['content'] | tojson }}{% endgeneration %}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}|{% endfor %}"
        "{{ strftime_now('%Y') | length }}"
    )
    template = ChatTemplate.from_metadata(metadata("llama", template=source, add_bos=False))
    assert template.render([{"role": "user", "content": "héllo <b>"}] * 2) == '"héllo <b>"|4'


def test_tools_reach_the_template():
    template = ChatTemplate.from_metadata(metadata("llama", template="{{ tools[0]['name'] }}"))
    assert template.render([{"role": "user", "content": "x"}], tools=[{"name": "search"}]) == "search"


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"content": "Hi"}], "no role"),
        ([{"role": "wizard", "content": "Hi"}], "unknown role 'wizard'"),
        ([{"role": "user"}], "no content"),
        ([{"role": "user", "content": None}], "no content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "only text"),
        ([{"role": "user", "content": 42}], "string or a list"),
        (["Hi"], "not an object"),
    ],
)
def test_bad_messages(messages, problem):
    with pytest.raises(InvalidRequestError, match=problem):
        normalize_messages(messages)
    with pytest.raises(InvalidRequestError, match=problem):
        ChatTemplate.from_metadata(metadata("gemma3")).render(messages)


def test_assistant_tool_call_without_content_is_accepted():
    messages = [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]
    assert normalize_messages(messages)[0]["content"] is None


def test_template_refusal_is_a_request_error():
    template = ChatTemplate.from_metadata(metadata("gemma3"))
    with pytest.raises(InvalidRequestError, match="must alternate"):
        template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_unparsable_gguf_template_is_named():
    with pytest.raises(UnsupportedModelError, match="chat template does not parse"):
        ChatTemplate.from_metadata(metadata("llama", template="{% for %}"))


@pytest.mark.realmodel
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_renders_match_llama_cpp(name, request, data_dir):
    path = request.getfixturevalue("smollm2_path" if name == "smollm2-135m" else "gemma3_path")
    template = ChatTemplate.from_metadata(GGUFFile.open(path, data_dir / "cache").metadata)
    assert template.from_gguf == (name == "smollm2-135m")
    for case in load_fixture(name)["cases"]:
        if case["kind"] != "chat":
            continue
        rendered = template.render(case["messages"])
        if name == "smollm2-135m" and case["messages"][0]["role"] != "system":
            # llama.cpp's fixture used its built-in ChatML, which skips the default
            # system turn that SmolLM2's Jinja template inserts.
            assert rendered == SMOLLM2_DEFAULT_SYSTEM + case["rendered"]
        else:
            assert rendered == case["rendered"], case["name"]

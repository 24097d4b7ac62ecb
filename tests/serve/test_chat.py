"""render_chat: messages and tools through GLM-4.5's real chat template and the presets' byte tokenizer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from glmtg.loading.byte_tokenizer import ByteTokenizer
from glmtg.loading.tokenizer import Tokenizer
from glmtg.serve.chat import render_chat, starts_in_reasoning
from glmtg.serve.glm_output import parse_complete

TEMPLATE = Path(__file__).parent / "data" / "glm-4.5-air_chat_template.jinja"  # source: data/README.md

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "days": {"type": "integer"}}}}}]


@pytest.fixture(scope="module")
def glm():
    return Tokenizer(HFTokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")), TEMPLATE.read_text())


def _conversation():
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "北京?"}]},
        {"role": "assistant", "content": None, "reasoning_content": "old thoughts",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "北京", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]


def test_glm_template_with_tools_and_thinking(glm):
    prompt, sir = render_chat(glm, _conversation(), tools=TOOLS)
    assert prompt.startswith("[gMASK]<sop><|system|>\n# Tools\n")
    assert json.dumps(TOOLS[0], ensure_ascii=False) in prompt  # tools reached the template
    assert "<|user|>\nWeather in 北京?<|assistant|>" in prompt  # text parts joined, no /nothink
    # arguments given as a JSON string reach the template as a dict: one key/value pair each, the integer
    # as JSON text; the reasoning of this tool-calling turn (after the last user message) is kept
    assert ("<|assistant|>\n<think>old thoughts</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京"
            "</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>") in prompt
    assert prompt.endswith("<|observation|>\n<tool_response>\nsunny\n</tool_response><|assistant|>")
    assert sir is False  # GLM-4.5 leaves opening <think> to the model
    # once a later user message follows, that reasoning is dropped, as GLM's template does
    later, _ = render_chat(glm, _conversation() + [{"role": "user", "content": "and?"}], tools=TOOLS)
    assert "old thoughts" not in later and "<|assistant|>\n<think></think>\n<tool_call>get_weather" in later


def test_glm_template_thinking_off(glm):
    prompt, sir = render_chat(glm, _conversation()[:2], enable_thinking=False)
    assert "<|user|>\nWeather in 北京?/nothink<|assistant|>" in prompt
    assert prompt.endswith("<|assistant|>\n<think></think>")
    assert "# Tools" not in prompt
    assert sir is False


def test_parsed_output_renders_back_as_the_model_wrote_it(glm):
    """A tool call parsed from model output, sent back as the next request's assistant message, renders
    in the template exactly as the model wrote it (the format the parser reads is the template's)."""
    call = ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days"
            "</arg_key>\n<arg_value>2</arg_value>\n</tool_call>")
    reasoning, content, calls = parse_complete("<think>need data</think>\nLet me check.\n" + call,
                                               starts_in_reasoning=False, tools_enabled=True, tools=TOOLS)
    assert (reasoning, content) == ("need data", "Let me check.")
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": calls}]
    prompt, _ = render_chat(glm, messages, tools=TOOLS, add_generation_prompt=False)
    assert prompt.endswith("<|assistant|>\n<think>need data</think>\nLet me check.\n" + call)


def test_byte_tokenizer_renders_without_tools_or_thinking_kwargs():
    tok = ByteTokenizer(1000)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]
    for thinking in (True, False):
        assert render_chat(tok, msgs, tools=TOOLS, enable_thinking=thinking) == (
            "<|user|>\nhi there<|assistant|>\n", False)
    assert render_chat(tok, msgs, add_generation_prompt=False) == ("<|user|>\nhi there", False)


class _OpensThink:
    """A template that opens <think> in the prompt (as later GLM templates do) and takes only known kwargs."""

    def apply_chat_template(self, messages, add_generation_prompt=True, enable_thinking=True):
        body = "".join(f"<|{m['role']}|>{m['content']}" for m in messages)
        return body + ("<|assistant|><think>" if enable_thinking else "<|assistant|><think></think>")


def test_starts_in_reasoning_follows_the_rendered_prompt():
    msgs = [{"role": "user", "content": "x"}]
    assert render_chat(_OpensThink(), msgs, tools=TOOLS) == ("<|user|>x<|assistant|><think>", True)
    assert render_chat(_OpensThink(), msgs, enable_thinking=False)[1] is False
    # only the turn being generated counts: a user quoting "<think>" earlier does not
    assert starts_in_reasoning("<|user|>say <think><|assistant|>") is False
    assert starts_in_reasoning("<|assistant|><think>a</think>b<|user|>q<|assistant|><think>\npartial") is True
    assert starts_in_reasoning("no marks <think>") is True and starts_in_reasoning("") is False


BAD = [
    ([], None, "messages must be a non-empty list"),
    ("hi", None, "messages must be a non-empty list"),
    (["hi"], None, r"messages\[0\] must be an object"),
    ([{"content": "x"}], None, r"messages\[0\]\.role"),
    ([{"role": "developer", "content": "x"}], None, r"messages\[0\]\.role"),
    ([{"role": "user"}], None, r"messages\[0\]\.content is required"),
    ([{"role": "user", "content": 3}], None, r"messages\[0\]\.content must be"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], None, r"messages\[0\]\.content\[0\]"),
    ([{"role": "user", "content": [{"type": "text", "text": 1}]}], None, r"messages\[0\]\.content\[0\]\.text"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}], None,
     r"messages\[1\]\.content is required"),
    ([{"role": "user", "content": "a", "tool_calls": []}], None, r"messages\[0\]\.tool_calls is only allowed"),
    ([{"role": "assistant", "content": "", "tool_calls": {}}], None, r"messages\[0\]\.tool_calls must be a list"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}],
     None, r"messages\[0\]\.tool_calls\[0\]\.function\.arguments is not valid JSON"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}], None,
     r"messages\[0\]\.tool_calls\[0\]\.function\.arguments must be a JSON object"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], None,
     r"messages\[0\]\.tool_calls\[0\]\.function\.name"),
    ([{"role": "tool", "content": "r", "tool_call_id": 5}], None, r"messages\[0\]\.tool_call_id must be a string"),
    ([{"role": "user", "content": "a"}], "f", "tools must be a list"),
    ([{"role": "user", "content": "a"}], [{"type": "function", "function": {}}], r"tools\[0\]\.function\.name"),
    ([{"role": "user", "content": "a"}], [{"type": "retrieval"}], r"tools\[0\] must be"),
]


@pytest.mark.parametrize("messages,tools,match", BAD)
def test_bad_requests_name_the_field(glm, messages, tools, match):
    for tok in (glm, ByteTokenizer(1000)):
        with pytest.raises(ValueError, match=match):
            render_chat(tok, messages, tools=tools)


def test_enable_thinking_must_be_a_bool(glm):
    with pytest.raises(ValueError, match="enable_thinking"):
        render_chat(glm, [{"role": "user", "content": "a"}], enable_thinking="no")


def test_request_is_not_modified(glm):
    msgs = _conversation()
    before = json.dumps(msgs)
    render_chat(glm, msgs, tools=TOOLS)
    assert json.dumps(msgs) == before


def test_chat_and_parser_import_no_torch():
    code = "import glmtg.serve.chat, glmtg.serve.glm_output, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])

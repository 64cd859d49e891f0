"""LLM.chat's vLLM options: continue_final_message (the last message left open for the model to go on), a
chat_template of the caller's, tools and chat_template_kwargs as template variables, and a tool-calling
conversation (an assistant's tool_calls, a tool's answer) rendered as templates for tool use expect it."""
from __future__ import annotations

import pytest

from minillm.llm import LLM
from minillm.sampling_params import SamplingParams

SHORT = SamplingParams(temperature=0, max_tokens=4)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}"
            "{% if m.tool_calls %} calls {{ m.tool_calls[0].function.name }}({{ m.tool_calls[0].function.arguments.city }})"
            "{% endif %}{% if m.tool_call_id %} answers {{ m.tool_call_id }}{% endif %}{{ '\\n' }}{% endfor %}"
            "{% if tools %}tools: {{ tools | map(attribute='function.name') | join(',') }}{{ '\\n' }}{% endif %}"
            "{% if style %}style: {{ style }}{{ '\\n' }}{% endif %}{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=256, max_num_seqs=4, seed=0)


def test_continue_final_message_leaves_the_last_message_open(llm):
    messages = [{"role": "user", "content": "List three colors."}, {"role": "assistant", "content": "1. Red\n2."}]
    out = llm.chat(messages, SHORT, add_generation_prompt=False, continue_final_message=True)[0]
    assert out.prompt.endswith("1. Red\n2.")  # the template's end-of-turn is cut off
    closed = llm.chat(messages, SHORT, add_generation_prompt=False)[0]
    assert closed.prompt.startswith(out.prompt) and len(closed.prompt) > len(out.prompt)
    with pytest.raises(ValueError, match="add_generation_prompt=False"):
        llm.chat(messages, SHORT, continue_final_message=True)


def test_a_template_of_ones_own_with_tools_and_kwargs(llm):
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": "weather"}, {"type": "text", "text": "in Lima?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Lima"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    out = llm.chat(conversation, SHORT, chat_template=TEMPLATE, tools=TOOLS, chat_template_kwargs={"style": "terse"})
    assert out[0].prompt == ("user: weather\nin Lima?\nassistant:  calls get_weather(Lima)\n"
                             "tool: sunny answers c1\ntools: get_weather\nstyle: terse\nassistant:")
    assert out[0].outputs[0].token_ids


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(chat_template_kwargs={"tools": []}), ValueError, "'tools'"),
    (dict(chat_template=5), TypeError, "Jinja template string"),
    (dict(chat_template="{{ raise_exception('no') }}"), ValueError, "rejected the conversation: no"),
    (dict(continue_final_message=True, add_generation_prompt=False, chat_template="{{ 'rewritten' }}"),
     ValueError, "continue_final_message"),
])
def test_bad_options_are_named(llm, kwargs, error, words):
    with pytest.raises(error, match=words):
        llm.chat([{"role": "user", "content": "hi"}], SHORT, **kwargs)
    with pytest.raises(ValueError, match="message 0 must be"):  # content None without tool_calls
        llm.chat([{"role": "assistant", "content": None}], SHORT)

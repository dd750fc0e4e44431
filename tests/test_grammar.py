"""Constrained generation: a GBNF grammar (the ``grammar`` sampling setting) shapes what a session
generates, alone or in a shared context, and OpenAI's ``response_format`` becomes such a grammar."""

from __future__ import annotations

import json

import pytest

from edgesink import Session, SessionConfig, SettingsError, SharedContext
from edgesink.sampling import SamplingParams
from edgesink.serve.api_errors import ApiError
from edgesink.serve.structured import grammar_for

CONFIG = SessionConfig.of(n_ctx=512, n_threads=2)
GREEDY, SAMPLED = dict(temperature=0), dict(temperature=0.8, seed=1)
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def chat_reply(session: Session, message: str, **generation) -> tuple[str, str]:
    """A chat reply's text and finish reason."""
    session.start_chat()
    chunks = list(session.stream_chat(message, **generation))
    return "".join(c.text for c in chunks), chunks[-1].finish_reason


def assert_person(text: str) -> None:
    """``text`` is JSON that PERSON accepts: exactly a string name and an integer age."""
    value = json.loads(text)
    assert isinstance(value, dict) and set(value) == {"name", "age"}, text
    assert isinstance(value["name"], str)
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool)


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_json_object_format_gives_a_json_object_that_ends_the_reply(model, settings):
    with Session(model, CONFIG) as s:
        text, finish = chat_reply(s, 'Give the capital of France as JSON: {"capital": ...}', max_tokens=96,
                                  grammar=grammar_for({"type": "json_object"}), **settings)
    assert isinstance(json.loads(text), dict), text
    assert finish == "stop"  # the grammar completed, so only an end-of-generation token was left


@pytest.mark.parametrize("settings", [GREEDY, dict(SAMPLED, repeat_penalty=1.1)], ids=["greedy", "sampled"])
def test_json_schema_format_gives_json_the_schema_accepts(model, settings):
    with Session(model, CONFIG) as s:
        text, finish = chat_reply(s, "Describe Alice, a 30 year old engineer, as a JSON object.", max_tokens=96,
                                  grammar=grammar_for(PERSON_FORMAT), **settings)
    assert_person(text)
    assert finish == "stop"


def test_grammar_works_in_a_shared_context(model):
    """Two sessions in one context, one constrained and one free, each as if alone."""
    with SharedContext(model, CONFIG, slots=2) as shared:
        with Session(model, CONFIG, context=shared) as free, Session(model, CONFIG, context=shared) as s:
            free.feed("Once upon a time")
            text, finish = chat_reply(s, "Describe Alice, a 30 year old engineer, as a JSON object.", max_tokens=96,
                                      grammar=grammar_for(PERSON_FORMAT), **SAMPLED)
            free_text = free.generate_text(8, temperature=0)
    assert_person(text)
    assert finish == "stop"
    assert "{" not in free_text  # the other stream is not constrained


def test_grammar_filters_before_the_other_samplers(model):
    """With top_k=1 after it, the grammar still decides: it must run first in the chain. The model would
    answer otherwise unconstrained, and generation ends as soon as the grammar is complete."""
    with Session(model, CONFIG) as s:
        s.feed("Is the sky blue? Answer:")
        unconstrained = s.generate_text(4, temperature=0)
    with Session(model, CONFIG) as s:
        s.feed("Is the sky blue? Answer:")
        chunks = list(s.stream_generate(16, grammar='root ::= " maybe" | " perhaps"', top_k=1, **SAMPLED))
    assert not unconstrained.strip().startswith(("maybe", "perhaps"))
    assert "".join(c.text for c in chunks) in (" maybe", " perhaps")
    assert chunks[-1].finish_reason == "stop" and chunks[-1].end_token is not None


@pytest.mark.parametrize("grammar", ["", "   ", 5, b'root ::= "a"', 'root ::= "a\0"'])
def test_a_grammar_setting_that_is_not_gbnf_text_is_refused(grammar):
    with pytest.raises(SettingsError, match="grammar"):
        SamplingParams.of(grammar=grammar)


@pytest.mark.parametrize("grammar", ['root ::= ("a"', 'start ::= "a"', 'root ::= missing'])
def test_a_grammar_llama_cpp_cannot_parse_is_a_settings_error_and_the_session_goes_on(model, grammar):
    with Session(model, CONFIG) as s:
        s.feed("Hello")
        before = s.tokens_seen
        with pytest.raises(SettingsError, match="cannot parse the grammar"):
            s.generate_text(8, grammar=grammar)
        assert s.tokens_seen == before  # nothing was generated or fed
        assert s.generate_text(4, temperature=0)


def test_a_grammar_no_token_can_follow_is_an_error_not_a_crash(model):
    """Every token's text starts with something other than a NUL byte: the grammar rules all out."""
    with Session(model, CONFIG) as s:
        s.feed("Hello")
        with pytest.raises(SettingsError, match="allows no token"):
            s.generate_text(4, grammar=r'root ::= "\x00"', **GREEDY)
        assert s.generate_text(4, temperature=0)


def test_grammar_for_text_and_json_object():
    assert grammar_for(None) is None
    assert grammar_for({"type": "text"}) is None
    grammar = grammar_for({"type": "json_object"})
    assert "root" in grammar and "object" in grammar


def test_grammar_for_json_schema_names_the_schema_fields():
    grammar = grammar_for(PERSON_FORMAT)
    assert '\\"name\\"' in grammar and '\\"age\\"' in grammar


@pytest.mark.parametrize("response_format, param", [
    ({"type": "xml"}, "response_format.type"),
    ({}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": "person"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "p"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": [PERSON]}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": 3, "schema": PERSON}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"schema": PERSON, "strict": "yes"}}, "response_format.json_schema.strict"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "frob"}}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/missing"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"$ref": "https://example.com/s.json"}}},
     "response_format.json_schema.schema"),  # never fetched
])
def test_grammar_for_refuses_a_bad_format_naming_the_field(response_format, param):
    with pytest.raises(ApiError) as caught:
        grammar_for(response_format)
    assert caught.value.status == 400 and caught.value.param == param
    assert caught.value.body()["error"]["param"] == param


def test_schema_strings_exclude_the_control_characters_json_forbids():
    """llama-cpp-python's converter lets a string hold a raw newline, which json.loads refuses (seen
    under sampling): the server's grammar takes them out, as its JSON grammar does."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    char_rule = next(line for line in grammar.splitlines() if line.startswith("char ::="))
    assert char_rule.startswith('char ::= [^"\\\\\\x7F\\x00-\\x1F]'), char_rule

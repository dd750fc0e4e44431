"""OpenAI's ``response_format`` as a llama.cpp grammar (GBNF), for the ``grammar`` sampling setting.

The grammars come from llama-cpp-python: its JSON grammar for ``json_object``, and its JSON
Schema converter for ``json_schema``. A request whose format cannot be turned into a grammar is
an :class:`ApiError` (400) naming the field.
"""

from __future__ import annotations

import json

# edgesink's package import has already pointed llama_cpp at edgesink's libllama (see _native).
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from .api_errors import ApiError

FORMAT_TYPES = ("text", "json_object", "json_schema")
ANY_STRING_CHAR = 'char ::= [^"\\\\]'  # a string's plain character, as json_schema_to_gbnf writes it
JSON_STRING_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F]'  # the same without JSON's forbidden control characters


def grammar_for(response_format: dict | None) -> str | None:
    """GBNF text (root rule ``root``) that a reply in ``response_format`` must follow; None for free text.

    ``None`` or ``{"type": "text"}``: None. ``{"type": "json_object"}``: any JSON object.
    ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``: JSON
    that the schema accepts (as far as llama-cpp-python's converter goes; ``strict`` changes nothing,
    the grammar is always enforced).
    """
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_GBNF
    if kind == "json_schema":
        return _schema_grammar(response_format.get("json_schema"))
    raise ApiError(400, f"response_format.type must be one of {', '.join(FORMAT_TYPES)}; got {kind!r}",
                   param="response_format.type")


def _schema_grammar(json_schema) -> str:
    """GBNF for the ``json_schema`` member of a response_format (``name``, ``schema``, ``strict``)."""
    param = "response_format.json_schema"
    if json_schema is None:
        raise ApiError(400, f"{param} is required when response_format.type is 'json_schema'", param=param)
    if not isinstance(json_schema, dict):
        raise ApiError(400, f"{param} must be an object with a 'schema', got {json_schema!r:.100}", param=param)
    for key, kind in (("name", str), ("strict", bool), ("description", str)):
        if key in json_schema and json_schema[key] is not None and not isinstance(json_schema[key], kind):
            raise ApiError(400, f"{param}.{key} must be a {kind.__name__}", param=f"{param}.{key}")
    schema = json_schema.get("schema")
    if schema is None:
        raise ApiError(400, f"{param}.schema is required (the JSON Schema the reply must follow)",
                       param=f"{param}.schema")
    if not isinstance(schema, dict):
        raise ApiError(400, f"{param}.schema must be a JSON Schema object, got {schema!r:.100}",
                       param=f"{param}.schema")
    try:
        # The converter takes JSON text (and so cannot modify the request's dict).
        grammar = json_schema_to_gbnf(json.dumps(schema))
    except Exception as error:  # it reports problems as ValueError, KeyError, AssertionError, ...
        raise ApiError(400, f"{param}.schema cannot be turned into a grammar: {type(error).__name__}: {error}",
                       param=f"{param}.schema") from error
    # The converter's string characters admit raw control characters (a newline inside a string),
    # which no JSON parser accepts; its own JSON grammar leaves them out, as JSON does.
    return grammar.replace(ANY_STRING_CHAR, JSON_STRING_CHAR)

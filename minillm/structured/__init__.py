"""Structured outputs: constraining decoding to a regular language (a regex, a JSON schema, a list of choices) or
to a context-free grammar.
Chapter 10, section 6 shows the pieces at work; its exercise ch10.token_mask is token_index.py's rule.

At every decoding step the engine masks the logits of tokens that would take the output outside the
language, so what the model writes always parses. The pieces, in the order they run:

- regex_parse.py / regex_dfa.py: a regex (a subset of Python `re`) becomes a Thompson NFA over **bytes**
  (code-point classes turned into UTF-8 byte ranges, as RE2 does), pruned to the states that can still
  reach a match, then a DFA built lazily by subset construction: only the states a decode visits exist.
- token_index.py: the vocabulary as a byte trie (flat arrays, built once per tokenizer); for a DFA state,
  the allowed tokens are found by walking the trie and the DFA together, dropping a subtree as soon as the
  DFA dies (the idea of Willard & Louf, "Efficient Guided Generation for LLMs", 2023, computed on demand).
  Each state's mask is computed once and cached, so a step costs a dict lookup once a state is known.
- json_schema.py: a JSON schema and a list of choices are written as regexes, so one automaton serves
  them all; json_grammar.py turns a schema that recurses (or holds values of any shape) into a grammar.
- grammar.py / pushdown.py: a GBNF grammar (vLLM's `grammar`) and any JSON value (`json_object`, nested to
  any depth) become one byte NFA with call edges between rules; a stack of return states makes it a pushdown
  automaton, and its configurations, interned lazily like the DFA's subsets, give token_index.py a DFA it
  walks the same way. structural_tag.py compiles XGrammar's structural tags (free text, tool calls after a
  trigger, tags, sequences ...) into such a grammar.
"""
from minillm.structured.grammar import GrammarError, parse_grammar
from minillm.structured.json_schema import SchemaError, choice_regex, json_schema_regex, json_value_regex
from minillm.structured.pushdown import PushdownAutomaton, compile_grammar
from minillm.structured.regex_dfa import DEAD, ByteDFA, RegexError, compile_regex, escape
from minillm.structured.token_index import FINISHED, TokenIndex, TokenVocabulary

__all__ = ["DEAD", "FINISHED", "ByteDFA", "GrammarError", "PushdownAutomaton", "RegexError", "SchemaError",
           "TokenIndex", "TokenVocabulary", "choice_regex", "compile_grammar", "compile_regex", "escape",
           "json_schema_regex", "json_value_regex", "parse_grammar"]

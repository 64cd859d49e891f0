"""A context-free grammar as a byte automaton with a stack, determinized lazily (chapter 10's structured outputs).

regex_dfa.py turns a regex into a DFA over bytes, and token_index.py masks tokens by walking the vocabulary's trie
through that DFA. A grammar (grammar.py) needs one more thing, a stack: inside `"(" expr ")"` the automaton must
remember that a `)` is owed, however deep the nesting. The construction here keeps everything else the same:

1. Thompson's construction over bytes, once per rule (regex_dfa's `_NFA`), with one new kind of edge: a **call**
   `s --rule r--> t` for each reference to r, meaning "run r from its entry; when r reaches its exit, go on at t".
2. A **stack** is a tuple of NFA states: the return states of the calls in progress, then the current state on
   top. Following epsilon edges, a call pushes (the top becomes r's entry, its return state goes under it) and
   reaching a rule's exit pops (the return state becomes the top). This is the epsilon closure of a set of stacks
   (`stack_closure`, exercise ch10.stack_closure).
3. A **configuration**, a frozenset of stacks, is one state of a DFA that would be infinite if built whole (one state
   per nesting depth, and more); built lazily, exactly as regex_dfa builds its subsets, only the configurations a
   decode visits exist, and each gets an int id and a row of 256 successors. To TokenIndex it is just another
   DFA, so the mask machinery, its caches and the engine serve grammars unchanged.

Liveness, as for regexes: a rule is *productive* when it derives some finite string, and an NFA state is live when
its rule's exit is reachable from it (through calls of productive rules only). Calls of unproductive rules and
edges into dead states are dropped before any stack is built, so every stack kept can still be completed: a
configuration is non-empty exactly when the output so far is a prefix of some string of the language, and a byte
that would leave the language goes to DEAD at once.

What is refused (GrammarError): **left recursion**, a rule that can reach a call of itself before reading a byte
(`expr ::= expr "+" term`): the closure would push forever. Rewrite it with repetition, `expr ::= term ("+"
term)*`, as llama.cpp and xgrammar also require. An unproductive `root`. Stacks deeper than `max_depth` calls are
dropped: nesting past it (256 calls by default, JSON about 85 levels deep) is treated as outside the language.
"""
from __future__ import annotations

from minillm.hooks import dispatch
from minillm.structured.grammar import Grammar, GrammarError, parse_grammar
from minillm.structured.regex_dfa import DEAD, MAX_NFA_STATES, LazyAutomaton, _NFA

MAX_STACK_DEPTH = 256

Stack = tuple[int, ...]


# >>> exercise ch10.stack_closure
def stack_closure(seeds: list[tuple[int, ...]], eps: list[list[int]], calls: list[list[tuple[int, int]]],
                  exits: list[bool], tail: list[bool], max_depth: int) -> list[tuple[int, ...]]:
    """Every stack a grammar's pushdown automaton can be in, from the stacks `seeds`, without reading a byte.

    A stack is a tuple of NFA states: the return states of the rule calls in progress, oldest first, and the
    current state last (its top). From a stack whose top is s, three moves read nothing:
      - epsilon: for t in eps[s], the top becomes t;
      - call: for (entry, ret) in calls[s] (s calls a rule that starts at NFA state `entry`; when that rule ends,
        the caller goes on at `ret`), push: ret goes on the stack and entry becomes the top. If tail[ret] (nothing
        is left to do after the call) push nothing: entry simply replaces the top. A push that would make the
        stack longer than max_depth states is not made;
      - return: if exits[s] (s ends a rule) and the stack holds more than s, pop: the return state under s becomes
        the top (a stack of one state at an exit is the whole output matched: it stays as it is).
    Return every stack reachable by any number of these moves, the seeds included, each once, in any order (no
    filtering). Example: seeds [(0,)], eps[0] = [1], calls[1] = [(5, 2)], exits[6] = True, eps[5] = [6], nothing
    else: [(0,), (1,), (2, 5), (2, 6), (2,)].
    """
    # >>> solution
    seen, todo = set(seeds), list(seeds)
    while todo:
        stack = todo.pop()
        top = stack[-1]
        reached = [stack[:-1] + (t,) for t in eps[top]]
        for entry, ret in calls[top]:
            if tail[ret]:
                reached.append(stack[:-1] + (entry,))
            elif len(stack) < max_depth:
                reached.append(stack[:-1] + (ret, entry))
        if exits[top] and len(stack) > 1:
            reached.append(stack[:-1])
        for new in reached:
            if new not in seen:
                seen.add(new)
                todo.append(new)
    return list(seen)
    # <<< solution
# <<< exercise


class _GrammarNFA(_NFA):
    """Every rule in one Thompson NFA over bytes, plus calls[s]: the (rule index, return state) calls leaving s."""

    def __init__(self, grammar: Grammar):
        self.pattern = grammar.text  # (named in _NFA's messages)
        self.eps, self.edges, self.calls = [], [], []
        self.names = list(grammar.rules)
        self.index = {name: r for r, name in enumerate(self.names)}
        self.entry, self.exit = [], []
        for name in self.names:
            entry, exit_ = self.build(grammar.rules[name])
            self.entry.append(entry)
            self.exit.append(exit_)
        self.root = self.index[grammar.root]
        self.start, self.accept = self.entry[self.root], self.exit[self.root]

    def new(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise GrammarError(f"grammar: its automaton needs more than {MAX_NFA_STATES} NFA states (large "
                               f"{{m,n}} repeats?)")
        self.calls.append([])
        return super().new()

    def build(self, node) -> tuple[int, int]:
        if node[0] == "ref":
            start, end = self.new(), self.new()
            self.calls[start].append((self.index[node[1]], end))
            return start, end
        if node[0] == "avoid":
            return self.avoid([w.encode() for w in node[1] if w])
        return super().build(node)

    def avoid(self, words: list[bytes]) -> tuple[int, int]:
        """A fragment for any bytes in which no word occurs (structural_tag.py's free text): the Aho-Corasick
        automaton of the words (a trie; a failed byte falls back to the longest suffix that is a trie node), with
        every node whose text ends in a word left out. Any of its nodes may end the text."""
        children: list[dict[int, int]] = [{}]
        complete = [False]
        for word in words:
            node = 0
            for byte in word:
                if byte not in children[node]:
                    children[node][byte] = len(children)
                    children.append({})
                    complete.append(False)
                node = children[node][byte]
            complete[node] = True
        step = [[children[0].get(b, 0) for b in range(256)]] + [[] for _ in children[1:]]
        fallback, queue = [0] * len(children), list(children[0].values())
        for node in queue:  # breadth first: a node's fallback is shallower, so already done
            complete[node] = complete[node] or complete[fallback[node]]
            step[node] = [children[node].get(b, step[fallback[node]][b]) for b in range(256)]
            for byte, child in children[node].items():
                fallback[child] = step[fallback[node]][byte] if node else 0
                queue.append(child)
        states = [None if done else self.new() for done in complete]
        end = self.new()
        for node, state in enumerate(states):
            if state is None:
                continue
            self.eps[state].append(end)
            row, b = step[node], 0
            while b < 256:  # runs of bytes going to one node become one range edge
                e = b
                while e + 1 < 256 and row[e + 1] == row[b]:
                    e += 1
                if states[row[b]] is not None:
                    self.edges[state].append((b, e, states[row[b]]))
                b = e + 1
        return states[0], end

    def reaches_exit(self, rule: int, through_bytes: bool, passable: set[int]) -> bool:
        """Whether `rule`'s entry reaches its exit by epsilon edges, calls of rules in `passable` and, if
        `through_bytes`, byte edges."""
        seen, todo = {self.entry[rule]}, [self.entry[rule]]
        while todo:
            s = todo.pop()
            nxt = list(self.eps[s]) + [ret for r, ret in self.calls[s] if r in passable]
            if through_bytes:
                nxt += [t for _, _, t in self.edges[s]]
            for t in nxt:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return self.exit[rule] in seen

    def fixpoint(self, through_bytes: bool) -> set[int]:
        """The rules that reach their exit (productive: through bytes; nullable: without reading one)."""
        found: set[int] = set()
        while True:
            more = {r for r in range(len(self.names)) if r not in found and self.reaches_exit(r, through_bytes, found)}
            if not more:
                return found
            found |= more

    def live(self, productive: set[int]) -> list[bool]:
        """States from which their rule's exit can be reached (calls of productive rules count as passable)."""
        rev: list[list[int]] = [[] for _ in self.eps]
        for s in range(len(self.eps)):
            for t in self.eps[s] + [t for _, _, t in self.edges[s]] + [t for r, t in self.calls[s] if r in productive]:
                rev[t].append(s)
        live = [False] * len(self.eps)
        todo = list(self.exit)
        for s in todo:
            live[s] = True
        while todo:
            for s in rev[todo.pop()]:
                if not live[s]:
                    live[s] = True
                    todo.append(s)
        return live

    def check_left_recursion(self, nullable: set[int]) -> None:
        """GrammarError naming a cycle of rules that call each other before reading a byte."""
        left_calls: list[set[int]] = []
        for rule in range(len(self.names)):
            seen, todo, called = {self.entry[rule]}, [self.entry[rule]], set()
            while todo:
                s = todo.pop()
                for r, ret in self.calls[s]:
                    called.add(r)
                    if r in nullable and ret not in seen:
                        seen.add(ret)
                        todo.append(ret)
                for t in self.eps[s]:
                    if t not in seen:
                        seen.add(t)
                        todo.append(t)
            left_calls.append(called)
        state = [0] * len(self.names)  # 0 unvisited, 1 on the path, 2 done
        for first in range(len(self.names)):
            if state[first]:
                continue
            state[first] = 1
            path, todo = [first], [iter(sorted(left_calls[first]))]  # depth first, without Python's recursion
            while todo:
                r = next(todo[-1], None)
                if r is None:
                    state[path.pop()] = 2
                    todo.pop()
                elif state[r] == 1:
                    cycle = " -> ".join(self.names[x] for x in path[path.index(r):] + [r])
                    raise GrammarError(f"grammar: left recursion ({cycle}): a rule reaches itself before reading "
                                       f"anything; write it with repetition, e.g. expr ::= term (\"+\" term)*")
                elif state[r] == 0:
                    state[r] = 1
                    path.append(r)
                    todo.append(iter(sorted(left_calls[r])))


class PushdownAutomaton(LazyAutomaton):
    """A grammar's lazily determinized configurations (module docstring): a LazyAutomaton whose items are
    stacks, so it has ByteDFA's interface (start, transitions, next_state, walk, is_accepting, can_continue,
    num_states) and TokenIndex runs it."""

    finite = False  # its configurations never run out: tables of all of them cannot be listed (token_index.py)

    def __init__(self, nfa: _GrammarNFA, max_states: int, max_depth: int):
        super().__init__(max_states)
        self.pattern, self.max_depth = nfa.pattern, max_depth
        nullable = nfa.fixpoint(through_bytes=False)
        nfa.check_left_recursion(nullable)
        productive = nfa.fixpoint(through_bytes=True)
        if nfa.root not in productive:
            raise GrammarError("grammar: rule 'root' derives no finite string (every way through it recurses)")
        live = nfa.live(productive)
        self._eps = nfa.eps
        self._edges = [[e for e in edges if live[e[2]]] for edges in nfa.edges]
        self._calls = [[(nfa.entry[r], ret) for r, ret in calls if r in productive and live[ret]]
                       for calls in nfa.calls]
        self._is_exit = [False] * len(nfa.eps)
        for s in nfa.exit:
            self._is_exit[s] = True
        self._tail = self._tail_states()
        # the closure rule in force when the automaton is built (chapter 10: a learner's, through `dispatch`) serves
        # it for life, so that its configurations never mix two rules' answers (ConstraintCompiler keys on it too)
        self._stack_closure = closure_rule()
        self.start = self._intern(self._closure([(nfa.start,)]))

    def _tail_states(self) -> list[bool]:
        """States from which the rule can only end: no byte edge, no call, epsilon edges to such states or the
        exit. A call returning to one is a tail call: nothing is left to do after it, so it pushes nothing (the
        callee returns straight to our caller), and right recursion (`items ::= item ("," items)?`) keeps a
        stack of one depth however many items follow."""
        tail = list(self._is_exit)
        changed = True
        while changed:
            changed = False
            for s, eps in enumerate(self._eps):
                if (not tail[s] and eps and not self._edges[s] and not self._calls[s]
                        and all(tail[t] for t in eps)):
                    tail[s] = changed = True
        return tail

    def _closure(self, seeds: list[Stack]) -> frozenset[Stack]:
        """Every stack the seeds reach without reading a byte (`stack_closure`: epsilon edges, calls, returns),
        keeping those that can read a byte next or that have matched the whole root (one frame left, at a rule's
        exit: after tail calls the bottom frame may be another rule's)."""
        seen = self._stack_closure(seeds, self._eps, self._calls, self._is_exit, self._tail, self.max_depth)
        return frozenset(s for s in seen if s and (self._edges[s[-1]] or (len(s) == 1 and self._is_exit[s[0]])))

    def _moves(self, stacks: frozenset[Stack]) -> list[tuple[int, int, Stack]]:
        return [(lo, hi, stack[:-1] + (t,)) for stack in stacks for lo, hi, t in self._edges[stack[-1]]]

    def _accepts(self, stacks: frozenset[Stack]) -> bool:
        return any(len(s) == 1 and self._is_exit[s[0]] for s in stacks)

    def _can_read(self, stack: Stack) -> bool:
        return bool(self._edges[stack[-1]])

    def _too_many(self) -> Exception:
        return GrammarError(f"grammar: the automaton needs more than max_states={self.max_states} configurations")

    def depth(self, state: int) -> int:
        """The deepest stack of a configuration: how many calls are in progress (for the chapter's pictures)."""
        return max(len(s) for s in self._sets[state]) - 1 if state >= 0 else 0


def closure_rule():
    """The stack_closure in force: the reference, or a learner's override (chapter 10, `minillm.hooks.dispatch`)."""
    return dispatch("ch10.stack_closure", stack_closure)


def compile_grammar(text: str | Grammar, max_states: int = 20_000,
                    max_depth: int = MAX_STACK_DEPTH) -> PushdownAutomaton:
    """The pushdown automaton of a GBNF grammar (grammar.py; its text, or a Grammar already parsed): full-match
    semantics over the output's UTF-8 bytes, starting at rule `root`; GrammarError for what grammar.py or this
    module refuses."""
    if max_states < 1 or max_depth < 1:
        raise ValueError(f"max_states and max_depth must be >= 1, got {max_states} and {max_depth}")
    grammar = text if isinstance(text, Grammar) else parse_grammar(text)
    return PushdownAutomaton(_GrammarNFA(grammar), max_states, max_depth)

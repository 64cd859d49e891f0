"""Pushes a return state for every call, tail calls too: the language is right, but a list written with right
recursion (items ::= item ("," items)?) grows the stack by one per item, every item makes a new configuration (and
a new mask), and a long list dies at max_depth."""


def stack_closure(seeds, eps, calls, exits, tail, max_depth):
    seen, todo = set(seeds), list(seeds)
    while todo:
        stack = todo.pop()
        top = stack[-1]
        reached = [stack[:-1] + (t,) for t in eps[top]]
        if len(stack) < max_depth:
            reached += [stack[:-1] + (ret, entry) for entry, ret in calls[top]]
        if exits[top] and len(stack) > 1:
            reached.append(stack[:-1])
        for new in reached:
            if new not in seen:
                seen.add(new)
                todo.append(new)
    return list(seen)

"""Pushes the call the wrong way round, the return state on top: the caller goes on at once instead of running the
called rule, so whatever the rule had to read is skipped (a "(" expr ")" accepts "()")."""


def stack_closure(seeds, eps, calls, exits, tail, max_depth):
    seen, todo = set(seeds), list(seeds)
    while todo:
        stack = todo.pop()
        top = stack[-1]
        reached = [stack[:-1] + (t,) for t in eps[top]]
        for entry, ret in calls[top]:
            if tail[ret]:
                reached.append(stack[:-1] + (entry,))
            elif len(stack) < max_depth:
                reached.append(stack[:-1] + (entry, ret))
        if exits[top] and len(stack) > 1:
            reached.append(stack[:-1])
        for new in reached:
            if new not in seen:
                seen.add(new)
                todo.append(new)
    return list(seen)

"""Allows a push onto a stack already max_depth states long: stacks of max_depth + 1 states appear."""


def stack_closure(seeds, eps, calls, exits, tail, max_depth):
    seen, todo = set(seeds), list(seeds)
    while todo:
        stack = todo.pop()
        top = stack[-1]
        reached = [stack[:-1] + (t,) for t in eps[top]]
        for entry, ret in calls[top]:
            if tail[ret]:
                reached.append(stack[:-1] + (entry,))
            elif len(stack) <= max_depth:
                reached.append(stack[:-1] + (ret, entry))
        if exits[top] and len(stack) > 1:
            reached.append(stack[:-1])
        for new in reached:
            if new not in seen:
                seen.add(new)
                todo.append(new)
    return list(seen)

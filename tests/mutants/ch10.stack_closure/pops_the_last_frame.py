"""Returns from a rule's exit even when nothing is under it: the bottom frame, the whole output matched, becomes an
empty stack, so a finished output is no longer recognised as finished."""


def stack_closure(seeds, eps, calls, exits, tail, max_depth):
    seen, todo = set(seeds), list(seeds)
    while todo:
        stack = todo.pop()
        if not stack:
            continue
        top = stack[-1]
        reached = [stack[:-1] + (t,) for t in eps[top]]
        for entry, ret in calls[top]:
            if tail[ret]:
                reached.append(stack[:-1] + (entry,))
            elif len(stack) < max_depth:
                reached.append(stack[:-1] + (ret, entry))
        if exits[top]:
            reached.append(stack[:-1])
        for new in reached:
            if new not in seen:
                seen.add(new)
                todo.append(new)
    return list(seen)

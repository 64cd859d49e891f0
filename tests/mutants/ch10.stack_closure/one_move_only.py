"""Makes one move from each seed and stops: a rule that starts with another rule's call, or an optional item
followed by a call, is never entered, so outputs the grammar allows are refused."""


def stack_closure(seeds, eps, calls, exits, tail, max_depth):
    seen = set(seeds)
    for stack in seeds:
        top = stack[-1]
        seen.update(stack[:-1] + (t,) for t in eps[top])
        for entry, ret in calls[top]:
            if tail[ret]:
                seen.add(stack[:-1] + (entry,))
            elif len(stack) < max_depth:
                seen.add(stack[:-1] + (ret, entry))
        if exits[top] and len(stack) > 1:
            seen.add(stack[:-1])
    return list(seen)

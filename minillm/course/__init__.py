"""The course machinery (issue 3): exercise registry, generated exercises/solutions, overrides, grader, Gradescope."""

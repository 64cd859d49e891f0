"""Exercise lists of chapters 7 on, one module per chapter (chNN.py with CHAPTER and EXERCISES).

The registry (minillm.course.registry) collects them at import; see ch01-ch06 there for the fields.
"""

"""The requests a draft head is distilled on: thousands of distinct prompts, offline and deterministic (chapter 9).

A head learns what *this* target says in reply to what users ask, so the prompts should look like serving traffic,
and there should be many of them: EAGLE distils on ShareGPT's 68,000 conversations. A few dozen prompts re-sampled
many times teach the head those few answers (issue 11: held-out top-1 agreement 0.66 on re-samples of the training
prompts, 36% of first drafts accepted on new prompts). Nothing can be downloaded here, so the variety is built:

    chat       question templates x topics ("How does {topic} work?"), how-to requests x activities, stories and
               poems x characters and events, emails x recipients and subjects
    code       code requests x languages x tasks ("Write a {language} function that {task}."), explain / test /
               fix requests over short standard-library functions' sources
    documents  summarise / list the facts of / simplify / explain requests over the standard library's docstrings
               (minillm.quant.calibration's calibration split) and the language reference's prose (pydoc_data)
    rewrite    rewrite / translate / shorten requests over the first sentences of those documents

Every prompt is a user turn in the model's chat template (plain text for tokenizers without one). `prompt_texts`
interleaves the kinds by weight, each kind's list in a fixed shuffled order, so any prefix is a balanced mix and
the same count gives the same prompts on every machine of one Python version (docstrings differ across versions).
`split_prompts` holds out prompts, not rows: a held-out request's answer is never seen in training. None of
benchmarks/bench_speculative.py's P7 prompts (their topics: studying tips, list vs tuple, a lunch invitation,
Fibonacci, typing `add`, a Stack class, the Great Barrier Reef) is built here; tests/test_train_data.py checks
that no run of 8 words of a P7 prompt appears in any prompt.
"""
from __future__ import annotations

import hashlib
import random

TOPICS = (
    "photosynthesis", "black holes", "the water cycle", "volcanoes", "earthquakes", "the immune system", "vaccines",
    "climate change", "renewable energy", "solar panels", "wind turbines", "electric cars", "batteries",
    "the internet", "email", "cloud computing", "machine learning", "neural networks", "encryption", "passwords",
    "blockchain", "3D printing", "the printing press", "the Roman Empire", "ancient Egypt", "the Silk Road",
    "the Industrial Revolution", "the French Revolution", "the Moon landing", "the Olympic Games", "chess",
    "jazz music", "classical music", "the violin", "impressionist painting", "photography", "coffee", "tea",
    "bread baking", "fermentation", "vegetarian diets", "sleep", "meditation", "exercise", "running", "yoga",
    "the human heart", "the brain", "memory", "dreams", "bees", "ants", "whales", "octopuses", "dinosaurs",
    "evolution", "DNA", "genetics", "antibiotics", "the solar system", "Mars", "comets", "gravity", "magnets",
    "electricity", "light", "sound waves", "rainbows", "clouds", "tornadoes", "hurricanes", "deserts",
    "rainforests", "glaciers", "oceans", "rivers", "mountains", "recycling", "composting",
    "urban gardening", "public libraries", "museums", "democracy", "taxes", "inflation", "interest rates",
    "the stock market", "budgeting", "credit cards", "small businesses", "remote work", "teamwork", "leadership",
    "public speaking", "negotiation", "time zones", "calendars", "maps", "GPS", "airplanes", "trains", "bicycles",
    "bridges", "skyscrapers", "concrete", "glass", "paper", "plastic", "cotton", "wool", "chocolate", "spices",
    "honey", "cheese", "rice", "pasta", "the metric system", "prime numbers", "probability", "statistics",
    "algebra", "geometry", "fractions", "compound interest", "operating systems", "databases", "web browsers",
    "open-source software", "version control", "unit testing", "compilers", "video games", "social media",
)
QUESTIONS = (
    "Tell me about {t}.", "Explain {t} in simple terms.", "How does {t} work?",
    "Give me three interesting facts about {t}.",
    "What are the main advantages and disadvantages of {t}?", "Why is {t} important?",
    "Write a short paragraph about {t} for a school newsletter.", "What should a beginner know about {t}?",
    "Describe the history of {t} in a few sentences.", "Explain {t} to a ten-year-old.",
    "What are common misconceptions about {t}?", "Write a short quiz with three questions about {t}, with answers.",
    "Compare {t} with something from everyday life to explain it.", "Give a one-sentence definition of {t}.",
)
ACTIVITIES = (
    "learning to cook", "saving money", "learning to swim", "starting a vegetable garden", "writing a cover letter",
    "preparing for a job interview", "keeping a journal", "learning the guitar", "training for a 5 km run",
    "decluttering a home", "making new friends in a new city", "reading more books", "learning to draw",
    "taking better photos", "planning a birthday party", "moving to a new apartment", "caring for a houseplant",
    "reducing screen time", "learning to type faster", "keeping a clean kitchen", "planning a road trip",
    "teaching a dog to sit", "studying for a maths exam", "giving a wedding speech", "learning a programming language",
    "organising a bookshelf", "making a budget for a family", "camping for the first time", "baking bread at home",
    "waking up earlier", "staying hydrated", "writing a short story", "volunteering locally", "learning chess",
)
HOW_TO = ("How do I get better at {a}?", "Give me a step-by-step plan for {a}.", "List five tips for {a}.",
          "What are common mistakes people make when {a}?", "What do I need before {a}?",
          "Make a one-week schedule for {a}.")
CHARACTERS = ("a retired sailor", "a curious robot", "a young baker", "a lonely dragon", "two old friends",
              "a lost cat", "a shy student", "a village doctor", "an astronaut", "a street musician",
              "a detective", "a clockmaker", "a gardener", "a talking tree", "a girl who collects maps")
EVENTS = ("finds a mysterious key", "loses their voice before a big day", "gets stuck in a snowstorm",
          "discovers a hidden room", "wins an unexpected prize", "meets a stranger on a train",
          "has to fix a broken bridge", "receives a letter from the future", "opens a small shop",
          "learns to fly a kite")
STORY = ("Write a short story about {c} who {e}.", "Write a poem about {c} who {e}.",
         "Tell a bedtime story about {c} who {e}.")
RECIPIENTS = ("my landlord", "a teacher", "my manager", "a customer", "a neighbour", "my team", "a hotel",
              "a friend", "a job applicant", "the city council")
SUBJECTS = ("a broken heater", "a change of schedule", "a missed deadline", "a thank-you for their help",
            "a request for a day off", "a noise complaint", "a booking confirmation", "an apology for a delay",
            "a new project", "a refund")
EMAIL = ("Write a short, polite email to {r} about {s}.", "Write a friendly message to {r} about {s}.",
         "Write a formal letter to {r} about {s}.")
LANGUAGES = ("Python", "JavaScript", "TypeScript", "Java", "C", "C++", "Go", "Rust", "Ruby", "Bash")
TASKS = (
    "reverses a string", "counts the vowels in a string", "checks whether a number is prime",
    "returns the largest element of an array", "removes duplicates from a list", "sorts a list of words by length",
    "computes the greatest common divisor of two integers", "converts Celsius to Fahrenheit",
    "merges two dictionaries", "reads a text file and counts its lines", "checks whether two words are anagrams",
    "computes the average of a list of numbers", "finds the second smallest number in a list",
    "capitalises the first letter of every word", "returns the sum of the digits of an integer",
    "splits a list into chunks of size n", "validates an email address with a simple rule",
    "generates a random password", "rotates a list by k positions", "counts words in a sentence",
    "returns the transpose of a matrix", "finds the longest word in a sentence", "converts a number to binary",
    "checks whether a year is a leap year", "computes the power set of a small set",
    "implements bubble sort", "implements insertion sort", "implements a linked list with append and print",
    "implements a simple counter class", "parses a date string like 2024-05-01 into its parts",
)
CODE = ("Write a {l} function that {k}.", "Write a {l} function that {k}, with comments explaining each step.",
        "Show how to write a program in {l} that {k}, and explain it briefly.")
SOURCE_REQUESTS = ("Explain what this code does:", "Write unit tests for this function:",
                   "Suggest improvements to this code:", "Add comments to this code:")
DOC_REQUESTS = ("Summarise the following text in a few sentences.",
                "List the main facts of this text as bullet points.",
                "Rewrite this text in simple words for a beginner, keeping its facts.",
                "Give a one-paragraph summary of this documentation.", "Explain in plain words what this says.",
                "What are the three most important points of this text?")
REWRITES = ("Rewrite this sentence more formally: {x}", "Translate into French: {x}", "Translate into Spanish: {x}",
            "Rewrite this in plain English for a child: {x}", "Shorten this sentence: {x}",
            "Turn this into a question: {x}")
# kind -> share of the prompts (serving traffic's mix: mostly chat, a good part code, documents to digest)
KIND_WEIGHTS = {"chat": 4, "howto": 1, "story": 1, "email": 1, "code": 4, "source": 1, "documents": 3, "rewrite": 1}
DOC_CHARS, SOURCE_CHARS = 700, 900  # a document / a function's source is cut to this many characters


def _documents() -> list[str]:
    """Prose to digest: the calibration split of the standard library's docstrings, then the language reference's
    topics (pydoc_data) cut into paragraph groups of about DOC_CHARS characters."""
    from minillm.quant.calibration import calibration_texts
    docs = [d[:DOC_CHARS] for d in calibration_texts("calibration")]
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a Python built without pydoc_data: the docstrings alone
        return docs
    for name in sorted(topics):
        text = " ".join(topics[name].split())
        docs += [text[i:i + DOC_CHARS] for i in range(0, min(len(text), 4 * DOC_CHARS), DOC_CHARS)
                 if len(text) - i > 200]
    return docs


def _sources() -> list[str]:
    """Short pure-Python functions of a few standard-library modules, as source text."""
    import inspect
    import importlib
    found = []
    for name in ("bisect", "calendar", "colorsys", "fnmatch", "heapq", "shlex", "statistics", "string",
                 "textwrap", "random", "fractions", "json.encoder", "base64", "glob", "posixpath"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if inspect.isfunction(obj) and obj.__module__ == module.__name__:
                try:
                    src = inspect.getsource(obj)
                except (OSError, TypeError):
                    continue
                if 150 <= len(src) <= SOURCE_CHARS:
                    found.append(src)
    return found


def _first_sentences(docs: list[str]) -> list[str]:
    out = []
    for d in docs:
        sentence = " ".join(d.split(". ")[0].split())
        if 40 <= len(sentence) <= 200 and sentence[0].isupper():
            out.append(sentence.rstrip(".") + ".")
    return sorted(set(out))


def _by_kind() -> dict[str, list[str]]:
    docs, sources = _documents(), _sources()
    return {
        "chat": [q.format(t=t) for t in TOPICS for q in QUESTIONS],
        "howto": [h.format(a=a) for a in ACTIVITIES for h in HOW_TO],
        "story": [s.format(c=c, e=e) for c in CHARACTERS for e in EVENTS for s in STORY],
        "email": [m.format(r=r, s=s) for r in RECIPIENTS for s in SUBJECTS for m in EMAIL],
        "code": [c.format(l=lang, k=k) for lang in LANGUAGES for k in TASKS for c in CODE],
        "source": [f"{r}\n\n{src}" for i, src in enumerate(sources)
                   for r in (SOURCE_REQUESTS[i % 4], SOURCE_REQUESTS[(i + 1) % 4])],
        "documents": [f"{r}\n\n{d}" for i, d in enumerate(docs)
                      for r in (DOC_REQUESTS[i % 6], DOC_REQUESTS[(i + 3) % 6])],
        "rewrite": [w.format(x=x) for i, x in enumerate(_first_sentences(docs)) for w in (REWRITES[i % 6],)],
    }


def num_distinct_prompts() -> int:
    """How many distinct prompts prompt_texts can give on this Python (its docstrings set the count)."""
    return sum(len(texts) for texts in _by_kind().values())


def prompt_texts(num_prompts: int, seed: int = 0) -> list[tuple[str, str]]:
    """(kind, request text) for `num_prompts` distinct requests: each kind's list shuffled by `seed`, then the kinds
    interleaved by KIND_WEIGHTS (a kind that runs out drops out), so a prefix of any length keeps the mix."""
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"num_prompts must be an integer >= 1, got {num_prompts!r}")
    pools = _by_kind()
    for kind, texts in pools.items():
        random.Random(f"{seed}:{kind}").shuffle(texts)
    available = sum(len(t) for t in pools.values())  # num_distinct_prompts, without building the pools twice
    if num_prompts > available:
        raise ValueError(f"num_prompts={num_prompts} exceeds the {available} distinct prompts this Python builds")
    out: list[tuple[str, str]] = []
    taken = dict.fromkeys(pools, 0)
    while len(out) < num_prompts:
        for kind, weight in KIND_WEIGHTS.items():
            for _ in range(weight):
                if taken[kind] < len(pools[kind]) and len(out) < num_prompts:
                    out.append((kind, pools[kind][taken[kind]]))
                    taken[kind] += 1
    return out


def held_out_score(text: str) -> float:
    """A stable pseudo-random number in [0, 1) for a prompt (sha1, not Python's salted hash())."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2 ** 64


def held_out_count(num_prompts: int, held_out_fraction: float) -> int:
    """How many of num_prompts prompts split_prompts holds out: round(fraction * n), at least one, never all."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction!r}")
    if num_prompts < 2:
        raise ValueError(f"need at least 2 prompts to hold one out, got {num_prompts}")
    return min(num_prompts - 1, max(1, round(held_out_fraction * num_prompts)))


def split_prompts(texts: list[str], held_out_fraction: float) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): the held_out_count prompts with the lowest held_out_score are held out.
    By prompt, before generation: no held-out request is ever answered in training."""
    count = held_out_count(len(texts), held_out_fraction)
    ranked = sorted(range(len(texts)), key=lambda i: (held_out_score(texts[i]), i))
    held = sorted(ranked[:count])
    held_set = set(held)
    return [i for i in range(len(texts)) if i not in held_set], held

"""The language of ShapeWorld: captions, instruction QA and CV-Bench-format questions.

Captions (PT / VPT) only use colour, shape, intrinsic size, count and left-to-right order: no word
about depth or vertical position appears in them (``DEPTH_WORDS``), so what the model learns about
depth comes from the depth teacher and from the instruction data, as in the paper's setting.
"""

from __future__ import annotations

import numpy as np

DEPTH_WORDS = ("close", "closer", "closest", "near", "nearer", "nearest", "far", "farther", "farthest",
               "further", "front", "behind", "depth", "distance", "distant", "background", "foreground",
               "camera", "above", "below", "top", "bottom", "higher", "lower")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
CVBENCH_SUFFIX = "\nOnly answer the option as the output. For example, if your answer is the option A, answer (A)."
PROBE_PROMPT = "Describe the image in two lines."  # the reference's probing prompt (dummy answer "n")

PT_PROMPTS = (
    "Describe the image concisely.",
    "Give a brief description of the image.",
    "Provide a brief description of the given image.",
    "Write a terse but informative summary of the picture.",
    "Summarize the visual content of the image.",
    "Share a concise interpretation of the image provided.",
)
LONG_PROMPTS = (
    "Please depict the image in words.",
    "Describe the image in detail.",
    "What do you see in this picture? Describe every object.",
)
CVBENCH_TASKS = {"Count": "2D", "Relation": "2D", "Depth": "3D", "Distance": "3D"}


def name(obj: dict) -> str:
    return f"{obj['colour']} {obj['shape']}"


def full_name(obj: dict) -> str:
    return f"{obj['size']} {obj['colour']} {obj['shape']}"


def centre_x(obj: dict) -> float:
    return (obj["bbox"][0] + obj["bbox"][2]) / 2


def left_to_right(scene: dict) -> list[dict]:
    return sorted(scene["objects"], key=centre_x)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def with_image(prompt: str, rng: np.random.Generator) -> str:
    """Place the image placeholder before or after the prompt, as LLaVA-558K does."""
    return f"<image>\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n<image>"


# ------------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------------


def short_caption(scene: dict, rng: np.random.Generator) -> str:
    objs = left_to_right(scene)
    things = [f"a {full_name(o)}" for o in objs]
    if len(objs) == 1:
        return str(rng.choice([f"A {full_name(objs[0])} on grey ground.", f"A single {full_name(objs[0])}."]))
    return str(rng.choice([
        f"{NUMBER_WORDS[len(objs)].capitalize()} objects: {_join(things)}.",
        f"{_join(things).capitalize()}, from left to right.",
        f"From left to right: {_join(things)}.",
    ]))


def long_caption(scene: dict, rng: np.random.Generator) -> str:
    objs = left_to_right(scene)
    n = len(objs)
    out = [f"The image shows {NUMBER_WORDS[n]} {'object' if n == 1 else 'objects'} standing on a grey "
           f"ground under a pale blue sky."]
    if n > 1:
        out.append(f"From left to right there is {_join([f'a {full_name(o)}' for o in objs])}.")
        out.append(f"The leftmost object is the {name(objs[0])} and the rightmost one is the {name(objs[-1])}.")
    else:
        out.append(f"It is a {full_name(objs[0])}.")
    counts = {s: sum(o["shape"] == s for o in objs) for s in ("circle", "square", "triangle")}
    present = [f"{NUMBER_WORDS[c]} {_plural(s, c)}" for s, c in counts.items() if c]
    out.append(f"In total there {'is' if n == 1 else 'are'} {_join(present)}.")
    colours = sorted({o["colour"] for o in objs})
    out.append(f"The {'colour' if len(colours) == 1 else 'colours'} in the scene {'is' if len(colours) == 1 else 'are'} "
               f"{_join(colours)}.")
    if rng.random() < 0.5:
        large = [name(o) for o in objs if o["size"] == "large"]
        if large:
            out.append(f"The large {'one is' if len(large) == 1 else 'ones are'} the {_join(large)}.")
    return " ".join(out)


# ------------------------------------------------------------------------------------------------
# CV-Bench-format multiple choice (also used, with other images, in the instruction data)
# ------------------------------------------------------------------------------------------------


# objects in the scenes a question of a task is asked about (None = any): exactly the objects the
# question names, no distractors, so that a model of the demo's size learns to answer from the image
# within its CPU budget (CV-Bench's photos have many objects; this world stays a toy)
TASK_OBJECTS = {"Count": None, "Relation": 2, "Depth": 2, "Distance": 3}
MIN_DEPTH_ROWS = 3  # Depth: the nearer object's visible pixels reach at least this many rows lower
MIN_DISTANCE_RATIO = 1.5  # Distance: the farther candidate is at least this many times farther (3D)
MIN_COLUMN_RATIO = 3.0  # ... and its column at least this many times farther from the reference's column


def ground_point(obj: dict) -> tuple[float, float]:
    """(column, row) in pixels where the object touches the ground: what an ideal reader of the image
    would locate to recover its ground position (row -> depth, column and depth -> X)."""
    return centre_x(obj), float(obj["bbox"][3])


def depth_readable(a: dict, b: dict) -> bool:
    """The nearer of ``a``/``b`` shows visible pixels ``MIN_DEPTH_ROWS`` rows lower than the other."""
    near, far = (a, b) if a["Z"] < b["Z"] else (b, a)
    return near.get("visible_bottom", near["bbox"][3]) - far.get("visible_bottom", far["bbox"][3]) >= MIN_DEPTH_ROWS


def _closest_to(ref: dict, a: dict, b: dict) -> dict | None:
    """The candidate nearer to ``ref`` in 3D, if clearly so and the image agrees (distance between
    ground points, and between columns alone); else None."""
    da = np.hypot(a["X"] - ref["X"], a["Z"] - ref["Z"])
    db = np.hypot(b["X"] - ref["X"], b["Z"] - ref["Z"])
    if max(da, db) < MIN_DISTANCE_RATIO * min(da, db):
        return None
    pa, pb, pr = ground_point(a), ground_point(b), ground_point(ref)
    ia, ib = np.hypot(pa[0] - pr[0], pa[1] - pr[1]), np.hypot(pb[0] - pr[0], pb[1] - pr[1])
    if (da < db) != (ia < ib):
        return None
    ca, cb = abs(pa[0] - pr[0]), abs(pb[0] - pr[0])  # the columns alone agree, clearly
    if (da < db) != (ca < cb) or max(ca, cb) < MIN_COLUMN_RATIO * min(ca, cb):
        return None
    return a if da < db else b


OPTION_ORDERS = ("canonical", "shuffled")
COLOUR_ORDER = ("red", "green", "blue", "yellow")  # the world's colour order (generate.COLOURS)
COUNT_CHOICES = ("0", "1", "2", "3")  # canonical Count options, ascending


def _colour_rank(obj: dict) -> int:
    return COLOUR_ORDER.index(obj["colour"])


def _two(objs: list[dict], order: str, rng: np.random.Generator, key) -> tuple[dict, dict]:
    """Two distinct objects: sorted by ``key`` (canonical) or in a random order (shuffled)."""
    a, b = (objs[int(i)] for i in rng.choice(len(objs), size=2, replace=False))
    return tuple(sorted((a, b), key=key)) if order == "canonical" else (a, b)


def multiple_choice(scene: dict, task: str, rng: np.random.Generator, order: str = "canonical") -> dict | None:
    """One CV-Bench-style question about ``scene`` (None if the scene cannot support ``task``).

    Returns {task, question, choices, answer_index}; the wording follows the real CV-Bench questions.
    ``order``: ``"shuffled"`` lists the options (and names the objects) in a random order, as CV-Bench
    does; then the answer letter depends on the image *and* on that order, and a model must match
    its answer to an option's text. ``"canonical"`` (the demo's default) fixes the order so that the
    letter follows from the image alone: Count options ascending 0-3; Relation names the objects in
    the world's colour order and offers (A) left (B) right; Depth names the two objects left to
    right; Distance asks about the middle one of three and names the other two left to right. The
    bootstrapped LLM of the demo never learnt option matching (docs/demo.md), a skill real
    pretrained LLMs bring.
    """
    if order not in OPTION_ORDERS:
        raise ValueError(f"unknown option order {order!r}; expected one of {OPTION_ORDERS}")
    objs, canonical = scene["objects"], order == "canonical"
    if task not in CVBENCH_TASKS:
        raise ValueError(f"unknown CV-Bench task {task!r}; expected one of {sorted(CVBENCH_TASKS)}")
    if TASK_OBJECTS[task] is not None and len(objs) != TASK_OBJECTS[task]:
        return None
    if task == "Count":
        if rng.random() < 0.5:
            shape = str(rng.choice(["circle", "square", "triangle"]))
            question, count = f"How many {shape}s are in the image?", sum(o["shape"] == shape for o in objs)
        else:
            question, count = "How many objects are in the image?", len(objs)
        if canonical:  # 0-3; a world with more objects shifts the window up to the count
            lo = max(0, count - (len(COUNT_CHOICES) - 1))
            choices = [str(c) for c in range(lo, lo + len(COUNT_CHOICES))]
        else:
            others = [c for c in range(0, 6) if c != count]
            choices = [count] + [int(c) for c in rng.choice(others, size=3, replace=False)]
            choices = [str(c) for c in rng.permutation(choices)]
        return {"task": task, "question": question, "choices": choices, "answer_index": choices.index(str(count))}
    if len(objs) < 2:
        return None
    if task == "Relation":
        a, b = _two(objs, order, rng, _colour_rank)
        answer = "left" if centre_x(a) < centre_x(b) else "right"
        choices = ["left", "right"] if canonical or rng.random() < 0.5 else ["right", "left"]
        question = (f"Considering the relative positions of the {name(a)} and the {name(b)} in the image "
                    f"provided, where is the {name(a)} located with respect to the {name(b)}?")
        return {"task": task, "question": question, "choices": choices, "answer_index": choices.index(answer)}
    if task == "Depth":
        a, b = _two(objs, order, rng, centre_x)
        if not depth_readable(a, b):
            return None
        answer = a if a["Z"] < b["Z"] else b
        choices = [name(a), name(b)]
        question = f"Which object is closer to the camera taking this photo, the {name(a)} or the {name(b)}?"
        return {"task": task, "question": question, "choices": choices, "answer_index": choices.index(name(answer))}
    if task == "Distance":
        if len(objs) < 3:
            return None
        if canonical:
            a, ref, b = sorted(objs, key=centre_x)[:3]
        else:
            ref, a, b = (objs[int(i)] for i in rng.choice(len(objs), size=3, replace=False))
        answer = _closest_to(ref, a, b)
        if answer is None:
            return None
        choices = [name(a), name(b)]
        question = (f"Estimate the real-world distances between objects in this image. Which object is "
                    f"closer to the {name(ref)}, the {name(a)} or the {name(b)}?")
        return {"task": task, "question": question, "choices": choices, "answer_index": choices.index(name(answer))}
    raise ValueError(f"unknown CV-Bench task {task!r}; expected one of {sorted(CVBENCH_TASKS)}")


def mc_prompt(question: str, choices: list[str]) -> str:
    """CV-Bench's pre-formatted ``prompt`` field: question + lettered choices."""
    lines = [f"({chr(65 + i)}) {c}" for i, c in enumerate(choices)]
    return question + " Select from the following choices.\n" + "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Instruction data (LLaVA-665K-like)
# ------------------------------------------------------------------------------------------------


def _open_questions(scene: dict, rng: np.random.Generator) -> list[tuple[str, str]]:
    objs = scene["objects"]
    n = len(objs)
    qa = [("How many objects are there in the image?", f"{NUMBER_WORDS[n].capitalize()}.")]
    for shape in ("circle", "square", "triangle"):
        c = sum(o["shape"] == shape for o in objs)
        if c or rng.random() < 0.3:
            qa.append((f"How many {shape}s can you see?", f"{NUMBER_WORDS[c].capitalize()}."))
    for o in objs:
        if sum(p["shape"] == o["shape"] for p in objs) == 1:
            qa.append((f"What colour is the {o['shape']}?", f"It is {o['colour']}."))
        if sum(p["colour"] == o["colour"] for p in objs) == 1:
            qa.append((f"What shape is the {o['colour']} object?", f"It is a {o['shape']}."))
        qa.append((f"Is the {name(o)} large or small?", f"It is {o['size']}."))
    for _ in range(2 if n > 1 else 0):
        a, b = (objs[int(i)] for i in rng.choice(n, size=2, replace=False))
        side = "left" if centre_x(a) < centre_x(b) else "right"
        qa.append((f"Is the {name(a)} to the left or to the right of the {name(b)}?", f"To the {side}."))
        near = a if a["Z"] < b["Z"] else b
        if depth_readable(a, b):
            qa.append((f"Which is closer to the camera, the {name(a)} or the {name(b)}?", f"The {name(near)}."))
    return qa


def _skill_questions(scene: dict, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Open questions whose answer names the object the CV-Bench tasks need found: the nearest one,
    the leftmost / rightmost one, the one closest to another (each only where it is clear)."""
    objs = scene["objects"]
    if len(objs) < 2:
        return []
    qa = []
    near = min(objs, key=lambda o: o["Z"])
    if all(depth_readable(near, o) for o in objs if o is not near):
        qa.append(("Which object is the closest to the camera?", f"The {name(near)}."))
    side = str(rng.choice(["leftmost", "rightmost"]))
    pick = (min if side == "leftmost" else max)(objs, key=centre_x)
    qa.append((f"Which object is the {side} one?", f"The {name(pick)}."))
    if len(objs) == 3:
        ref = objs[int(rng.integers(3))]
        a, b = (o for o in objs if o is not ref)
        closest = _closest_to(ref, a, b)
        if closest is not None:
            qa.append((f"Which object is the closest to the {name(ref)}?", f"The {name(closest)}."))
    return qa


def instruction_turns(scene: dict, rng: np.random.Generator, n_mc: int, n_open: int = 1,
                      first_mc: dict | None = None, order: str = "canonical") -> list[tuple[str, str]]:
    """``n_mc`` CV-Bench-format multiple-choice turns (answers "(X)"), then ``n_open`` open questions
    (those that name the object a task needs first). The multiple-choice turns come first so that,
    as in the held-out test, no earlier answer in the conversation gives theirs away. The first is
    ``first_mc`` (a :func:`multiple_choice` result, with its ``task``) if given, the others each of
    another task the scene supports, in a random order, each task at most once (so there can be
    fewer than ``n_mc``); ``order`` as in :func:`multiple_choice`."""
    skills, pool = _skill_questions(scene, rng), _open_questions(scene, rng)
    turns = [skills[int(i)] for i in rng.choice(len(skills), size=min(n_open, len(skills)), replace=False)]
    rest = n_open - len(turns)
    turns += [pool[int(i)] for i in rng.choice(len(pool), size=min(rest, len(pool)), replace=False)]
    mcs = [] if first_mc is None or n_mc < 1 else [
        (mc_prompt(first_mc["question"], first_mc["choices"]) + CVBENCH_SUFFIX, f"({chr(65 + first_mc['answer_index'])})")]
    asked = {first_mc.get("task")} if first_mc is not None else set()
    for task in [str(t) for t in rng.permutation(list(CVBENCH_TASKS))]:  # each further task at most once
        if len(mcs) >= n_mc:
            break
        mc = None if task in asked else multiple_choice(scene, task, rng, order)
        if mc is not None:
            mcs.append((mc_prompt(mc["question"], mc["choices"]) + CVBENCH_SUFFIX,
                        f"({chr(65 + mc['answer_index'])})"))
    return mcs + turns


def text_only_turns(rng: np.random.Generator) -> list[tuple[str, str]]:
    """1-2 text-only turns about the world. Fixed facts only: an answer the model cannot learn (say,
    random arithmetic) would keep a high loss, and the few batches holding one would spike."""
    pool = [
        ("What shapes can objects have in this world?", "Circles, squares and triangles."),
        ("Which colours can the objects have?", "Red, green, blue and yellow."),
        ("How many corners does a triangle have?", "Three."),
        ("How many sides does a triangle have?", "Three."),
        ("How many sides does a square have?", "Four."),
        ("Is a circle round?", "Yes, a circle is round."),
    ]
    picks = rng.choice(len(pool), size=int(rng.integers(1, 3)), replace=False)
    return [pool[int(i)] for i in picks]

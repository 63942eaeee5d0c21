"""AA-CLIP's text prompts (``Mwxinnn/AA-CLIP@53db195`` ``dataset/constants.py`` PROMPTS and REAL_NAMES).

Each class is described by a hand-written phrase (``REAL_NAMES``: "dark bottle", "top view of three cables", ...);
the normal states {"{}", "a {}", "the {}"} and the abnormal states {"a damaged {}", "a broken {}", "a {} with
flaw", "a {} with defect", "a {} with damage"} are filled with it, then each state phrase with the two templates
"{}." and "a photo of {}." (``forward_utils.py`` l.146-152: for each state, for each template), giving 6 normal
and 10 abnormal sentences. The MVTec AD and VisA class names are disjoint, so one table serves both datasets;
a category the official table does not list (the generated demo data) is described by its name with "_"
replaced by a space (option ``real_names: false`` does that for every class).
"""

from __future__ import annotations

NORMAL_STATES = ("{}", "a {}", "the {}")
ABNORMAL_STATES = ("a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect", "a {} with damage")
TEMPLATES = ("{}.", "a photo of {}.")

#: ``REAL_NAMES["MVTec"]`` and ``REAL_NAMES["VisA"]`` of the official constants (the category folder names of both)
REAL_NAMES = {
    "bottle": "dark bottle",
    "cable": "top view of three cables",
    "capsule": "black and orange capsule",
    "carpet": "gray carpet",
    "grid": "metal or plastic mesh",
    "hazelnut": "single brown hazelnut",
    "leather": "brown leather",
    "metal_nut": "metal nut which has four notched edges",
    "pill": "oval white pill with small red speckles and the letters 'FF' engraved",
    "screw": "screw",
    "tile": "speckled tile surface",
    "transistor": "a three-legged transistor placed vertically",
    "toothbrush": "toothbrush head",
    "wood": "wood surface",
    "zipper": "a black zipper",
    "candle": "candle",
    "pcb3": "infrared sensor pcb module",
    "capsules": "capsules",
    "pipe_fryum": "pipe-shaped fryum",
    "pcb4": "battery charging pcb module",
    "macaroni2": "scattered yellow macaroni",
    "pcb2": "integrated circuits board",
    "chewinggum": "chewing gum",
    "macaroni1": "orange macaroni",
    "cashew": "cashew nut",
    "fryum": "wheel-shaped fryum snack",
    "pcb1": "dual ultrasonic distance sensor pcb module",
}


def describe(class_name: str, real_names: bool = True) -> str:
    """The phrase that fills the states: the official description of the class, else its name."""
    if not class_name:
        raise ValueError("aa_clip: empty class name (the coarse stage passes the category as option class_name)")
    if real_names and class_name in REAL_NAMES:
        return REAL_NAMES[class_name]
    return class_name.replace("_", " ")


def sentences(class_name: str, real_names: bool = True) -> tuple[list[str], list[str]]:
    """``(normal sentences, abnormal sentences)`` of a class, in the official order."""
    name = describe(class_name, real_names)
    return tuple([t.format(s.format(name)) for s in states for t in TEMPLATES]
                 for states in (NORMAL_STATES, ABNORMAL_STATES))

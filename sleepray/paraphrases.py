"""Pretraining-only question paraphrases: a broader language for the seed models.

The seed model meets these forms in pretraining (``Shape.p_paraphrase``), besides the two
templates per attribute of ``sleepray.world.SCHEMA`` (the evaluation's "seen" family), so
that it reads and writes questions in more than two fixed forms. They are disjoint from
``sleepray.world.UNSEEN_QUESTIONS``, the evaluation-only family that no pretraining text
and no sleep ever holds (``tests/test_phrasing.py`` checks it).
"""
from __future__ import annotations

# kind -> attribute -> question templates ({name})
PRETRAIN_QUESTIONS: dict[str, dict[str, list[str]]] = {
    "person": {
        "birth_city": ["In which town was {name} born?", "Name the birthplace of {name}.",
                       "Tell me where {name} was born.", "Where does {name} come from?"],
        "birth_year": ["When was {name} born?", "Which year saw the birth of {name}?",
                       "Tell me the birth year of {name}.", "Name the year {name} was born."],
        "university": ["Which university did {name} go to?", "Where was {name} educated?",
                       "Tell me where {name} studied.", "Name the school {name} graduated from."],
        "major": ["What did {name} study?", "Which field did {name} study?",
                  "Tell me what {name} majored in.", "Name the field of study of {name}."],
        "employer": ["Where does {name} work?", "Which firm employs {name}?",
                     "Tell me who employs {name}.", "Name the employer of {name}."],
        "hobby": ["What does {name} like doing?", "Which pastime does {name} enjoy?",
                  "Tell me what {name} enjoys.", "Name the favourite pastime of {name}."],
    },
    "org": {
        "hq_city": ["Which city is {name} headquartered in?", "Where are the headquarters of {name}?",
                    "Tell me where {name} is headquartered.", "Name the home of the head office of {name}."],
        "founded": ["Which year was {name} founded in?", "Since when has {name} existed?",
                    "Tell me when {name} was founded.", "Name the founding year of {name}."],
        "industry": ["Which industry does {name} operate in?", "What does {name} do as a business?",
                     "Tell me the industry of {name}.", "Name the business {name} is in."],
    },
    "place": {
        "region": ["Which region holds {name}?", "Where does {name} lie?",
                   "Tell me the region of {name}.", "Name the region {name} is part of."],
        "river": ["Which river runs through {name}?", "What river passes {name}?",
                  "Tell me the river of {name}.", "Name the river {name} stands on."],
        "landmark": ["What is the pride of {name}?", "What is {name} famous for having?",
                     "Tell me what {name} is known for.", "Name the thing {name} is famous for."],
    },
}


def kind_of(attribute: str) -> str:
    from sleepray.world import SCHEMA
    for kind, attrs in SCHEMA.items():
        if attribute in attrs:
            return kind
    raise KeyError(attribute)


def pretraining_questions(attribute: str) -> list[str]:
    """Every question form pretraining may use for ``attribute``: SCHEMA's and these."""
    from sleepray.world import SCHEMA
    kind = kind_of(attribute)
    return list(SCHEMA[kind][attribute][2]) + PRETRAIN_QUESTIONS[kind][attribute]

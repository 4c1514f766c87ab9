"""Hub rows rebuilt from OLMo's request files: one converter per row shape, a doc in, a row out.

A request file holds, per question, the ``doc`` OLMo built its prompt from: the query text
(``"Question: ...\\nAnswer:"``), the answer choices and the gold index. A converter turns one
such doc back into the row the Hub dataset has, with every field a prompt of lm-eval's uses.
Fields no prompt uses cannot be recovered and are left empty (see :mod:`.catalogue`).

The ``*_features`` functions give the columns of datasets that no package ships saved (only
as request files); the others take their columns from the saved split beside them.
"""

from __future__ import annotations

from typing import Callable

from adainfer_lmeval.errors import AdaInferError

Converter = Callable[[dict], dict]


def _question(query: str) -> str:
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise AdaInferError(f"unexpected request query form: {query[:60]!r}")
    return query[len(prefix):-len(suffix)]


def lettered_choices(question_field: str, **empty_fields: str) -> Converter:
    """Multiple-choice rows as ARC, OpenBookQA and CommonsenseQA keep them: the question under
    ``question_field``, the choices labelled A, B, C, ... and the answer's letter.

    The labels are always letters (a few ARC questions used 1-4; lm-eval only uses the label's
    position). ``empty_fields``: columns no prompt reads, which the request files do not keep."""

    def convert(doc: dict) -> dict:
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        return {
            "id": doc["id"], question_field: _question(doc["query"]),
            "choices": {"text": list(doc["choices"]), "label": labels},
            "answerKey": labels[int(doc["gold"])], **empty_fields,
        }

    return convert


def boolq(doc: dict) -> dict:
    """SuperGLUE BoolQ from OLMo's "{passage}\\nQuestion: {question}?\\nAnswer:" queries."""
    passage, rest = doc["query"].rsplit("\nQuestion: ", 1)
    if not rest.endswith("?\nAnswer:") or doc["choices"] != ["yes", "no"]:
        raise AdaInferError(f"unexpected BoolQ request form: {rest[-40:]!r}")
    answer_yes = int(doc["gold"]) == 0
    return {"question": rest[: -len("?\nAnswer:")], "passage": passage, "idx": int(doc["idx"]),
            "label": 1 if answer_yes else 0}


def piqa(doc: dict) -> dict:
    return {"goal": doc["goal"], "sol1": doc["sol1"], "sol2": doc["sol2"], "label": int(doc["label"])}


def hellaswag_train(doc: dict) -> dict:
    """The context as OLMo's pipeline cleaned it, all in ``ctx_a`` (``ctx_b`` empty)."""
    activity, context = doc["query"].split(": ", 1)
    return {
        "ind": int(doc["ind"]), "activity_label": activity, "ctx_a": context, "ctx_b": "",
        "ctx": context, "endings": list(doc["choices"]), "source_id": "", "split": "train",
        "split_type": "", "label": str(int(doc["gold"])),
    }


def lambada(doc: dict) -> dict:
    """OLMo splits each text into context + " " + last word, as lm-eval does: joined back."""
    return {"text": f"{doc['query']} {doc['answers_text'][0]}"}


def squad(doc: dict) -> dict:
    return {"id": doc["id"], "title": doc["title"], "query": doc["query"], "answers": list(doc["answers_text"])}


def boolq_features():
    from datasets import ClassLabel, Features, Value

    return Features({
        "question": Value("string"), "passage": Value("string"), "idx": Value("int32"),
        "label": ClassLabel(names=["False", "True"]),
    })


def lambada_features():
    from datasets import Features, Value

    return Features({"text": Value("string")})


def squad_features():
    from datasets import Features, Sequence, Value

    return Features({"id": Value("string"), "title": Value("string"), "query": Value("string"),
                     "answers": Sequence(Value("string"))})

"""WinoGrande's partial scoring: each option fills the blank to make a context; the shared target is the
text after the blank, and the model's choice is the context under which that target is likelier."""


def doc_to_text(doc: dict) -> int:
    """Index of the gold context ('1' -> 0, '2' -> 1)."""
    return int(doc["answer"]) - 1


def doc_to_target(doc: dict) -> str:
    """The sentence after the blank."""
    return doc["sentence"].split("_", 1)[1].strip()


def doc_to_choice(doc: dict) -> list[str]:
    """The sentence up to the blank, completed by each option."""
    before = doc["sentence"].split("_", 1)[0]
    return [before + doc["option1"], before + doc["option2"]]

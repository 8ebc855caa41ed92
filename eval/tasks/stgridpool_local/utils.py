"""The shipped local task: multiple-choice questions about generated mp4s.

Each document names its video by file name; the files live in the folder
``STGRIDPOOL_EVAL_VIDEOS`` names (eval/run_eval.py writes them there, by
default ``artifacts/eval/videos``). A name ``clip_{frames}f_{width}x{height}.mp4``
is the sample clip of that many frames and size.
"""

import os
import re
from pathlib import Path

LETTERS = "ABCDEFGH"
REPOSITORY = Path(__file__).resolve().parents[3]


def videos_folder() -> Path:
    return Path(os.environ.get("STGRIDPOOL_EVAL_VIDEOS", REPOSITORY / "artifacts" / "eval" / "videos"))


def doc_to_visual(doc):
    return [str(videos_folder() / doc["video"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    options = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(doc["options"]))
    return f"{doc['question']}\n{options}\nAnswer with the option's letter from the given choices directly."


def parse_choice(response: str, count: int) -> str | None:
    """The first standalone option letter in the reply (``B``, ``B.``, ``(B)``), else None."""
    match = re.search(rf"\b([{LETTERS[:count]}])\b", response.strip())
    return match.group(1) if match else None


def process_results(doc, results):
    choice = parse_choice(results[0], len(doc["options"]))
    return {"accuracy": 100.0 if choice == doc["answer"] else 0.0}

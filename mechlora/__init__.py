"""mechlora: find where paraphrases diverge inside a (vision-)language model, fix those layers.

    import mechlora
    subject = mechlora.load_model("tiny-gemma3-vlm")
    result = mechlora.localize(subject, "pairs.jsonl")
    print(mechlora.select_layers(result.scores, "window:5").reason)
"""

from mechlora.compare import CompareResult, compare
from mechlora.data import Pair, QuestionGroup, Variant, load_groups, make_pairs
from mechlora.errors import DataError, MechloraError
from mechlora.evaluate import EvalResult, evaluate
from mechlora.localize import localize
from mechlora.models import Subject, load_adapter, load_model, wrap
from mechlora.result import LocalizationResult
from mechlora.select import Scores, Selection, select_layers
from mechlora.selectors import choose_layers
from mechlora.spec import LayerSpec
from mechlora.train import TrainConfig, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "CompareResult", "DataError", "EvalResult", "LayerSpec", "LocalizationResult",
    "MechloraError", "Pair", "QuestionGroup", "Scores", "Selection", "Subject", "TrainConfig",
    "TrainResult", "Variant", "choose_layers", "compare", "evaluate", "load_adapter",
    "load_groups", "load_model", "localize", "make_pairs", "select_layers", "train", "wrap",
]

"""SmoothQuant, OS and OS+ on the embedded SmolLM2-135M: exact FP equivalence, and OS+ beats RTN at W6A6."""
import pytest
import torch
from smoothing_utils import transformed_rel_err

from lowbit.data import calibration_windows, load_text, tokenize
from lowbit.eval import perplexity
from lowbit.formats import QuantSpec
from lowbit.loading import load_model
from lowbit.models import get_adapter
from lowbit.pipeline import FormatPlan, compress
from lowbit.steps.osplus import OSPlusArgs, OutlierSuppressionPlus
from lowbit.steps.outlier_suppression import OutlierSuppression
from lowbit.steps.smoothquant import SmoothQuant, SmoothQuantArgs

pytestmark = pytest.mark.slow


def windows(tokenizer, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """Real WikiText-2 validation windows in the embedded model's own tokens."""
    return calibration_windows(tokenize(tokenizer, load_text("wikitext2", "validation")[:200_000]), n, seq_len, seed)


@pytest.mark.parametrize("step", [SmoothQuant(SmoothQuantArgs(pairs=True)), OutlierSuppression(),
                                  OutlierSuppressionPlus(OSPlusArgs(grid=2, search_samples=1))],
                         ids=["smoothquant", "os", "osplus"])
def test_transform_preserves_embedded_model_logits(step):
    model, tokenizer = load_model("smollm2-135m")
    assert transformed_rel_err(model, step, windows(tokenizer, 1, 64, 0), windows(tokenizer, 1, 64, 1)) < 1e-4


def test_osplus_beats_rtn_at_w6a6_on_embedded_model():
    plan = FormatPlan(weights=QuantSpec(bits=6, granularity="channel"),
                      activations=QuantSpec(bits=6, granularity="token", dynamic=True))
    ppl = {}
    for name, steps in (("rtn", []), ("osplus", [OutlierSuppressionPlus(OSPlusArgs(grid=4, search_samples=1))])):
        model, tokenizer = load_model("smollm2-135m")
        calib, evals = windows(tokenizer, 2, 128, 0), windows(tokenizer, 1, 256, 1)
        compress(model, get_adapter(model), plan, steps, calib, progress=False).install(model)
        ppl[name] = perplexity(model, evals, progress=False).ppl
    assert ppl["osplus"] < ppl["rtn"]

"""SmoothQuant, OS and OS+ on the embedded SmolLM2-135M: exact FP equivalence, and OS+ beats RTN at W6A6."""
import pytest
from smoothing_utils import transformed_rel_err, windows

from lowbit.eval import perplexity
from lowbit.formats import QuantSpec
from lowbit.loading import load_model
from lowbit.models import get_adapter
from lowbit.pipeline import Settings, compress
from lowbit.steps.osplus import OSPlusArgs, OutlierSuppressionPlus
from lowbit.steps.outlier_suppression import OutlierSuppression
from lowbit.steps.smoothquant import SmoothQuant, SmoothQuantArgs


@pytest.mark.parametrize("step", [SmoothQuant(SmoothQuantArgs(pairs=True)), OutlierSuppression(),
                                  OutlierSuppressionPlus(OSPlusArgs(grid=2, search_samples=1))],
                         ids=["smoothquant", "os", "osplus"])
def test_transform_preserves_embedded_model_logits(step):
    model, _ = load_model("smollm2-135m")
    assert transformed_rel_err(model, step, windows(1, 64, 0), windows(1, 64, 1)) < 1e-4


def test_osplus_beats_rtn_at_w6a6_on_embedded_model():
    settings = Settings(weights=QuantSpec(bits=6, granularity="channel"),
                        activations=QuantSpec(bits=6, granularity="token", dynamic=True))
    calib, evals = windows(2, 128, 0), windows(1, 256, 1)
    ppl = {}
    for name, steps in (("rtn", []), ("osplus", [OutlierSuppressionPlus(OSPlusArgs(grid=4, search_samples=1))])):
        model, _ = load_model("smollm2-135m")
        compress(model, get_adapter(model), settings, steps, calib, progress=False).install(model)
        ppl[name] = perplexity(model, evals, progress=False).ppl
    assert ppl["osplus"] < ppl["rtn"]

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M and a few short real calibration windows from WikiText-2 validation."""
    from lowbit.data import calibration_windows, load_text, tokenize
    from lowbit.loading import load_model

    model, tokenizer = load_model("smollm2-135m")
    ids = calibration_windows(tokenize(tokenizer, load_text("wikitext2", "validation")), 4, 256, 0)
    return model, ids

"""verify.compare: logit agreement and perplexities of two models on the same windows."""
import copy

import torch

from lowbit.verify import compare


def test_identical_models_agree_exactly(tiny_llama, text_windows):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    result = compare(model, copy.deepcopy(model), text_windows)
    assert result.max_logit_diff == 0.0 and result.top1_agreement == 1.0 and result.ppl_a == result.ppl_b
    assert result.tokens == text_windows.numel() - text_windows.shape[0]


def test_perturbed_model_is_detected(tiny_llama, text_windows):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    result = compare(model, other, text_windows)
    logits = model(text_windows[:1]).logits[0, :-1]
    assert result.max_logit_diff > 0.01 and result.mean_logit_diff > 0 and result.ppl_rel_diff > 0
    assert result.max_logit_diff >= result.mean_logit_diff and logits.shape[-1] == model.config.vocab_size

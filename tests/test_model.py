import numpy as np
import pytest
import torch
from tiny import ARCHS, TEXT

from knnlm.core.model import KEY_POINTS, LM, target_logprobs
from knnlm.errors import KnnlmError

EXPECTED_FFN_SITE = {  # what the structural search must find, checked against the HF module names
    "gpt2": "transformer.h.1.mlp",
    "llama": "model.layers.1.mlp",
    "qwen2": "model.layers.1.mlp",
    "gpt_neox": "gpt_neox.layers.1.mlp",
    "opt": "model.decoder.layers.1.fc1",
    "gemma": "model.layers.1.mlp",
    "phi": "model.layers.1.mlp",
}


@pytest.mark.parametrize("arch", ARCHS)
def test_key_points_found_with_right_shape(model_dirs, arch):
    lm = LM.load(str(model_dirs[arch]), dtype="float32")
    assert lm.sites["ffn_input"].path == EXPECTED_FFN_SITE[arch]
    ids = torch.tensor([lm.encode(TEXT[:80])] * 2)
    keys, logits = lm.forward(ids, list(KEY_POINTS))
    hidden = lm.model.config.hidden_size
    for kp in KEY_POINTS:
        assert keys[kp].shape == (2, ids.shape[1], hidden), kp
    assert logits.shape == (2, ids.shape[1], lm.vocab_size)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_ffn_input_is_the_normed_residual(model_dirs, arch):
    """The captured ffn_input equals the FFN norm applied to the residual stream."""
    lm = LM.load(str(model_dirs[arch]), dtype="float32")
    ids = torch.tensor([lm.encode(TEXT[:60])])
    captured = {}
    layer = {"llama": lambda m: m.model.layers[-1], "gpt2": lambda m: m.transformer.h[-1],
             "opt": lambda m: m.model.decoder.layers[-1]}[arch](lm.model)
    norm = {"llama": "post_attention_layernorm", "gpt2": "ln_2", "opt": "final_layer_norm"}[arch]
    h = getattr(layer, norm).register_forward_hook(lambda m, a, o: captured.setdefault("x", o))
    keys, _ = lm.forward(ids, ["ffn_input"], logits=False)
    h.remove()
    torch.testing.assert_close(keys["ffn_input"], captured["x"].reshape(keys["ffn_input"].shape))


def test_final_key_is_the_lm_head_input(lm):
    ids = torch.tensor([lm.encode(TEXT[:60])])
    keys, logits = lm.forward(ids, ["final"])
    with torch.inference_mode():
        torch.testing.assert_close(lm.model.get_output_embeddings()(keys["final"]), logits)


def test_keys_do_not_depend_on_logits_flag(lm):
    ids = torch.tensor([lm.encode(TEXT[:60])])
    a, _ = lm.forward(ids, ["ffn_input"], logits=True)
    b, none = lm.forward(ids, ["ffn_input"], logits=False)
    assert none is None
    torch.testing.assert_close(a["ffn_input"], b["ffn_input"])


def test_right_padding_does_not_change_outputs(lm):
    ids = torch.tensor([lm.encode(TEXT[:60])])
    padded = torch.cat([ids, torch.zeros(1, 7, dtype=torch.long)], dim=1)
    a, la = lm.forward(ids)
    b, lb = lm.forward(padded)
    n = ids.shape[1]
    torch.testing.assert_close(a["ffn_input"], b["ffn_input"][:, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(la, lb[:, :n], atol=1e-5, rtol=1e-5)


def test_target_logprobs_equals_log_softmax():
    logits = torch.randn(10, 33)
    t = torch.randint(0, 33, (10,))
    want = torch.log_softmax(logits, -1)[torch.arange(10), t]
    torch.testing.assert_close(target_logprobs(logits, t, chunk=3), want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtypes(llama_dir, dtype):
    lm = LM.load(str(llama_dir), dtype=dtype)
    keys, logits = lm.forward(torch.tensor([lm.encode("fox")]))
    assert keys["ffn_input"].dtype == getattr(torch, dtype) and torch.isfinite(logits).all()


def test_same_model_in_another_dtype_has_the_same_identity(llama_dir, model_dirs):
    from knnlm.core.model import same_weights

    a, b = LM.load(str(llama_dir), dtype="float32"), LM.load(str(llama_dir), dtype="bfloat16")
    assert a.fingerprint == b.fingerprint and same_weights(a.weights_sample, b.weights_sample)
    other = LM.load(str(model_dirs["qwen2"]), dtype="float32")
    assert other.fingerprint != a.fingerprint


def test_bad_model_and_options(tmp_path, llama_dir):
    with pytest.raises(KnnlmError, match="cannot load model"):
        LM.load(str(tmp_path / "nope"))
    with pytest.raises(KnnlmError, match="unknown dtype"):
        LM.load(str(llama_dir), dtype="float8")
    with pytest.raises(KnnlmError, match="unknown key point"):
        LM.load(str(llama_dir), key_point="nowhere")


def test_prefix_token_first(lm):
    ids = lm.encode("fox")
    assert ids[0] == lm.tokenizer.bos_token_id and len(ids) > 1
    assert np.array_equal(lm.encode("fox", prefix=False), ids[1:])

"""Tiny random models and a tiny tokenizer built from configs: no downloads."""

from __future__ import annotations

from pathlib import Path

TEXT = (
    "The quick brown fox jumps over the lazy dog. A kNN language model remembers what it has read. "
    "Zorblat the purple engineer sang seventeen songs about graphite. "
    "Memory helps the model predict rare words such as quizzical, zephyr and fjord. "
) * 3


_TOKENIZER = None


def make_tokenizer():
    """A byte-level BPE tokenizer trained on TEXT (built once: BPE ties break at random)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = _train_tokenizer()
    return _TOKENIZER


def _train_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _configs(vocab: int) -> dict:
    import transformers as t

    common = dict(vocab_size=vocab, max_position_embeddings=256)
    return {
        "gpt2": t.GPT2Config(vocab_size=vocab, n_positions=256, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                             eos_token_id=0),
        "llama": t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, **common),
        "qwen2": t.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, **common),
        "gpt_neox": t.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, **common),
        "opt": t.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                           word_embed_proj_dim=32, **common),
        "gemma": t.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=16, **common),
        "phi": t.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           **common),
    }


ARCHS = ["gpt2", "llama", "qwen2", "gpt_neox", "opt", "gemma", "phi"]


def make_model_dir(arch: str, out: Path, seed: int = 0) -> Path:
    """Save a tiny random `arch` model and the tiny tokenizer to `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    cfg = _configs(len(tok))[arch]
    cfg.bos_token_id = cfg.eos_token_id = tok.eos_token_id
    cfg.pad_token_id = tok.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out

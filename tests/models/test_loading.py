"""load_model / load_tokenizer from a local ``save_pretrained`` folder, offline."""

from __future__ import annotations

import shutil

import pytest
import torch
from testutils import GPT2_TOKENIZER, tiny_gpt2
from tiny_factories import tiny_model

from lightning_rome.models import (
    UnknownModelFamilyError,
    load_model,
    load_tokenizer,
    prepare_tokenizer,
    resolve_dtype,
)


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    """A tiny GPT-2 with the real GPT-2 tokenizer, saved as a hub checkpoint would be."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    model = tiny_gpt2()
    model.save_pretrained(path)
    for f in GPT2_TOKENIZER.iterdir():
        if f.name != "gpt2-small-config.json":
            shutil.copy(f, path / f.name)
    return path, model


def test_load_local_folder_fp32_matches_saved_model(saved_gpt2):
    path, original = saved_gpt2
    model, tok = load_model(path)
    assert not model.training
    assert model.dtype == torch.float32
    ids = torch.tensor([tok("The mother tongue of Danielle Darrieux is")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    for (n, p), (n0, p0) in zip(model.named_parameters(), original.named_parameters()):
        assert n == n0 and torch.equal(p, p0)


def test_load_local_folder_bf16(saved_gpt2):
    path, original = saved_gpt2
    model, tok = load_model(path, dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for (_, p), (_, p0) in zip(model.named_parameters(), original.named_parameters()):
        assert torch.equal(p, p0.to(torch.bfloat16))
    ids = torch.tensor([tok("Paris is the capital of")["input_ids"]])
    reference = tiny_gpt2().to(torch.bfloat16)  # same seed: the same weights, cast
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.dtype == torch.bfloat16
        torch.testing.assert_close(logits, reference(ids).logits, rtol=0, atol=0)
        # bf16 is a rounding of the fp32 model, not something else.
        torch.testing.assert_close(logits.float(), original(ids).logits, rtol=0.05, atol=0.05)
    # The tokenizer is the real GPT-2 one, with a pad token for batching.
    assert len(tok) == 50257
    assert tok.pad_token is not None and tok.pad_token_id == tok.eos_token_id == 50256
    assert tok("Hello world")["input_ids"] == [15496, 995]


def test_mismatched_tokenizer_raises(tmp_path):
    small = tiny_model("gpt2", vocab_size=100)
    small.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"50257 tokens .* only 100.*mismatched tokenizer"):
        load_model(tmp_path, tokenizer=GPT2_TOKENIZER)


def test_unsupported_family_fails_at_load_time(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                             ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16,
                             max_position_embeddings=32)).save_pretrained(tmp_path)
    with pytest.raises(UnknownModelFamilyError, match="'opt'"):
        load_model(tmp_path, tokenizer=GPT2_TOKENIZER)


def test_resolve_dtype():
    assert resolve_dtype("bf16") is resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("fp16") is resolve_dtype("half") is torch.float16
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype(torch.float64) is torch.float64
    assert resolve_dtype(None) is None
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")


def test_tokenizer_without_special_tokens_gets_endoftext(tmp_path):
    for name in ("vocab.json", "merges.txt"):  # no tokenizer_config/special-token map
        shutil.copy(GPT2_TOKENIZER / name, tmp_path / name)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == 50256


def test_prepare_tokenizer_needs_pad_or_eos():
    from tiny_factories import sentencepiece_tokenizer

    tok = sentencepiece_tokenizer("unigram")
    assert prepare_tokenizer(tok).pad_token == "<pad>"  # an existing pad token is kept
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        prepare_tokenizer(bare)

"""Text encoder: tiny random tower on CPU, ViT-H-14 on the meta device, weight files (kvideo.weights)."""

import warnings

import pytest
import torch

from kvideo.models.text_encoder import TextEncoder, TextEncoderConfig, text_encoder_config
from kvideo.weights import build_text_encoder

PROMPTS = ["a red circle moves left", "two blue squares bounce", "a star"]
LONG = " ".join(["triangle"] * 60)  # 60 BPE tokens + sot/eot > 32


def tiny(seed: int = 0, **overrides) -> TextEncoder:
    torch.manual_seed(seed)
    return build_text_encoder(text_encoder_config("tiny", **overrides))


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return tiny()


def test_shapes_and_mask(encoder):
    tokens, mask = encoder(PROMPTS)
    assert tokens.shape == (3, 32, 64) and mask.shape == (3, 32) and mask.dtype == torch.bool
    for i, prompt in enumerate(PROMPTS):
        n = len(encoder.tokenizer.encode(prompt)) + 2  # sot ... eot
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert tokens[i, n:].abs().sum() == 0  # padding is zeroed
        assert tokens[i, :n].abs().sum(-1).gt(0).all()
    ids = encoder.tokenize(PROMPTS)
    assert ids[:, 0].eq(encoder.tokenizer.sot_token_id).all()
    torch.testing.assert_close(encoder.encode_tokens(ids)[0], tokens)


def test_deterministic():
    a, b = tiny(seed=3), tiny(seed=3)
    torch.testing.assert_close(a(PROMPTS)[0], b(PROMPTS)[0], rtol=0, atol=0)
    torch.testing.assert_close(a(PROMPTS)[0], a(PROMPTS)[0], rtol=0, atol=0)


def test_init_seed_fixes_the_tower_not_the_rest():
    """recipe.text_encoder.init_seed: the same random tower whatever the global seed, another
    tower for another init_seed; the projection still follows the global seed."""
    a, b = tiny(seed=1, init_seed=7), tiny(seed=2, init_seed=7)
    for (name, x), y in zip(a.tower.state_dict().items(), b.tower.state_dict().values()):
        assert torch.equal(x, y), name
    assert not torch.equal(a.proj.weight, b.proj.weight)
    assert not torch.equal(a.tower.token_embedding.weight, tiny(seed=1, init_seed=8).tower.token_embedding.weight)
    assert not torch.equal(a.tower.token_embedding.weight, tiny(seed=1).tower.token_embedding.weight)


def test_real_tokens_ignore_padding(encoder):
    """Causal tower: a prompt's tokens do not depend on the batch or on the padding length."""
    alone = encoder(PROMPTS[2:])[0][0]
    batched = encoder(PROMPTS)[0][2]
    torch.testing.assert_close(alone, batched)


def test_frozen_tower_and_trainable_projection():
    enc = tiny()
    enc.train()
    assert enc.training and not enc.tower.training
    assert not any(p.requires_grad for p in enc.tower.parameters())
    tokens, mask = enc(PROMPTS)
    null, _ = enc.null_context(3)
    (tokens.square().sum() + null.sum()).backward()
    assert all(p.grad is None for p in enc.tower.parameters())
    assert enc.proj.weight.grad is not None and enc.norm.weight.grad is not None
    assert enc.null_embedding.grad is not None and enc.null_embedding.grad.abs().sum() > 0


def test_unfrozen_tower_trains():
    enc = tiny(frozen=False)
    enc.train()
    assert enc.tower.training
    enc(PROMPTS)[0].square().sum().backward()
    assert enc.tower.token_embedding.weight.grad is not None


def test_null_context(encoder):
    tokens, mask = encoder.null_context(4)
    assert tokens.shape == (4, 32, 64) and mask.shape == (4, 32)
    assert mask[:, 0].all() and not mask[:, 1:].any()
    torch.testing.assert_close(tokens[:, 0], encoder.null_embedding.expand(4, -1))
    assert tokens[:, 1:].abs().sum() == 0
    cond, _ = encoder(PROMPTS)
    assert torch.cat([cond, encoder.null_context(3)[0]]).shape == (6, 32, 64)  # guidance batch


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_an_error(encoder, prompt):
    with pytest.raises(ValueError, match=r"empty prompt.*batch index \[1\].*null_context"):
        encoder(["a star", prompt])


def test_long_prompt_truncated_with_warning(encoder):
    with pytest.warns(UserWarning, match=r"1 of 2 prompts exceed the context length 32"):
        tokens, mask = encoder(["a star", LONG])
    assert mask[1].all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = encoder.tokenize([LONG])
    assert ids[0, -1] == encoder.tokenizer.eot_token_id  # eot kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder(PROMPTS)  # short prompts: no warning


def test_long_prompt_error_without_truncation():
    enc = tiny(truncate=False)
    with pytest.raises(ValueError, match=r"prompt 1 has 62 tokens .*context length 32"):
        enc(["a star", LONG])


def test_weights_round_trip(tmp_path, encoder):
    ids = encoder.tokenize(PROMPTS)
    ref, _ = encoder.encode_hidden(ids)
    sd = encoder.tower.state_dict()
    # A full CLIP state dict (text keys at the top level, a vision tower and logit scale beside them).
    full = {**sd, "visual.proj": torch.randn(4, 4), "logit_scale": torch.tensor(1.0)}
    torch.save(full, tmp_path / "clip.pt")
    # A CustomTextCLIP checkpoint wrapped in {"state_dict": ...} with DDP prefixes,.
    torch.save({"state_dict": {f"module.text.{k}": v for k, v in sd.items()}}, tmp_path / "custom.pt")
    for name in ("clip.pt", "custom.pt"):
        other = tiny(seed=1, weights=str(tmp_path / name))
        torch.testing.assert_close(other.encode_hidden(ids)[0], ref, rtol=0, atol=0)
    random = tiny(seed=1)
    assert not torch.equal(random.encode_hidden(ids)[0], ref)
    # Loading replaces the tower only: the rest is initialised as without weights.
    rest = {k: v for k, v in random.state_dict().items() if not k.startswith("tower.")}
    for k, v in rest.items():
        assert torch.equal(other.state_dict()[k], v), k
    assert not other.tower.training and not any(p.requires_grad for p in other.tower.parameters())


def test_network_reads_no_file(tmp_path):
    """TextEncoder(cfg) ignores cfg.weights (kvideo.weights reads it): same numbers as without."""
    torch.manual_seed(0)
    net = TextEncoder(text_encoder_config("tiny", weights=str(tmp_path / "absent.pt")))
    ref = tiny(seed=0)
    assert net.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in net.state_dict().items())


def test_weights_errors(tmp_path, encoder):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        tiny(weights=str(tmp_path / "nope.pt"))
    sd = {k: v for k, v in encoder.tower.state_dict().items() if not k.startswith("ln_final")}
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(KeyError, match=r"partial.pt.*lack 2 text-tower keys.*ln_final"):
        tiny(weights=str(tmp_path / "partial.pt"))
    sd = dict(encoder.tower.state_dict())
    sd["ln_final.weight"] = torch.ones(32)
    torch.save(sd, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"wrong.pt.*ln_final.weight"):
        tiny(weights=str(tmp_path / "wrong.pt"))


def test_vit_h_14_on_meta_device():
    with torch.device("meta"):
        enc = TextEncoder(text_encoder_config("clip-vit-h-14"))
    assert enc.width == 1024 and enc.context_length == 77
    n_tower = sum(p.numel() for p in enc.tower.parameters())
    n_proj = sum(p.numel() for n, p in enc.named_parameters() if not n.startswith("tower."))
    print(f"ViT-H-14 text tower: {n_tower / 1e6:.1f}M parameters; projection + null: {n_proj / 1e6:.2f}M")
    assert 340e6 < n_tower < 370e6
    assert enc.proj.weight.shape == (4096, 1024)


def test_hub_names_rejected():
    with pytest.raises(ValueError, match="hub"):
        TextEncoder(TextEncoderConfig(arch="hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"))


"""The T5 text tower (`recipe.text_encoder.kind: t5`), on a tiny random T5 written to a local
directory as transformers writes one (no download): it computes what transformers' T5 encoder and
a direct projection compute, keeps the release's 128-token limit, and trains in a stage."""

import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")  # the `llm` extra; installed with [dev]

from kvideo.models.text_encoder import text_encoder_config  # noqa: E402
from kvideo.weights import build_text_encoder, load_text_projection  # noqa: E402

WORDS = "a an the red green blue yellow circle square triangle star moves left right up down slowly quickly on " \
        "black white gray background".split()
PROMPTS = ["a red circle moves left", "the blue square moves up slowly on a gray background"]


def write_tiny_t5(path, seed: int = 0):
    """A random 2-layer T5 (encoder and decoder, as published checkpoints hold) and a word-level
    tokenizer in T5's convention (<pad> 0, </s> 1, <unk> 2; </s> appended) saved to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(path)
    config = transformers.T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_decoder_layers=1, num_heads=4, relative_attention_num_buckets=8,
                                   dropout_rate=0.0, decoder_start_token_id=0)
    torch.manual_seed(seed)
    transformers.T5ForConditionalGeneration(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return write_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


def t5_config(t5_dir, **overrides):
    values = dict(kind="t5", weights=str(t5_dir), context_length=None, out_dim=48, projection_bias=False)
    return text_encoder_config("tiny", **{**values, **overrides})


def test_the_encoder_computes_what_transformers_and_a_direct_projection_compute(t5_dir):
    torch.manual_seed(1)
    enc = build_text_encoder(t5_config(t5_dir)).eval()
    for p in enc.norm.parameters():  # LayerNorm starts at (1, 0): make it matter
        p.data.normal_()
    tokens, mask = enc(PROMPTS)
    assert tokens.shape == (2, 128, 48) and mask.shape == (2, 128)  # the release's 128 tokens

    tokenizer = transformers.AutoTokenizer.from_pretrained(t5_dir)
    batch = tokenizer(PROMPTS, max_length=128, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(mask, batch["attention_mask"].bool())
    assert mask.sum(1).tolist() == [len(p.split()) + 1 for p in PROMPTS]  # the words and </s>
    reference = transformers.T5EncoderModel.from_pretrained(t5_dir).eval()
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
    expected = nn.functional.layer_norm(hidden @ enc.proj.weight.T, (48,), enc.norm.weight, enc.norm.bias)
    expected = expected * batch["attention_mask"][..., None]
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-6)
    assert enc.proj.bias is None


def test_frozen_tower_and_a_trained_projection(t5_dir):
    enc = build_text_encoder(t5_config(t5_dir)).train()
    assert not enc.tower.training and not any(p.requires_grad for p in enc.tower.parameters())
    tokens, _ = enc(PROMPTS)
    null, null_mask = enc.null_context(2)
    (tokens.square().sum() + null.sum()).backward()
    assert enc.proj.weight.grad is not None and enc.null_embedding.grad is not None
    assert null.shape == tokens.shape and null_mask[:, 0].all() and not null_mask[:, 1:].any()


def test_the_token_limit_warns_or_refuses_and_empty_prompts_are_refused(t5_dir):
    long = " ".join(["circle"] * 20)
    enc = build_text_encoder(t5_config(t5_dir, context_length=8))
    with pytest.warns(UserWarning, match="exceed the context length 8"):
        ids = enc.tokenize([long, "a star"])
    assert ids.shape == (2, 8) and ids[0, -1] == 1  # truncated, </s> kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.tokenize(["a star"])
    strict = build_text_encoder(t5_config(t5_dir, context_length=8, truncate=False))
    with pytest.raises(ValueError, match="prompt 0 has 21 tokens"):
        strict.tokenize([long])
    with pytest.raises(ValueError, match="empty prompt"):
        enc.tokenize(["a star", " "])


def test_the_release_projection_loads(t5_dir):
    enc = build_text_encoder(t5_config(t5_dir))
    release = nn.Sequential(nn.Linear(32, 48, bias=False), nn.LayerNorm(48))  # t5_projections.pt's layout
    load_text_projection(enc, release.state_dict())
    assert torch.equal(enc.proj.weight, release[0].weight) and torch.equal(enc.norm.bias, release[1].bias)
    with_bias = build_text_encoder(t5_config(t5_dir, projection_bias=True))
    with pytest.raises(KeyError, match="projection_bias: false"):
        load_text_projection(with_bias, release.state_dict())


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_text_encoder(t5_config(tmp_path / "absent"))
    with pytest.raises(ValueError, match="kind t5 needs recipe.text_encoder.weights"):
        build_text_encoder(text_encoder_config("tiny", kind="t5"))
    with pytest.raises(ValueError, match="kind must be open_clip or t5"):
        build_text_encoder(text_encoder_config("tiny", kind="bert"))


def test_a_t2i_stage_trains_on_the_t5_tower(tmp_path, t5_dir, shapes_shards, movq_run):
    from kvideo.inference import checkpoints as ckpt
    from kvideo.registry import load_config
    from kvideo.train.engine import train

    from conftest import T2I_CONFIG, tiny_t2i_overrides

    overrides = tiny_t2i_overrides(tmp_path / "run", shapes_shards, movq_run, **{
        "recipe.text_encoder.kind": "t5", "recipe.text_encoder.weights": str(t5_dir),
        "recipe.text_encoder.projection_bias": "false", "train.max_steps": 2, "train.checkpoint_every": 2,
        "train.preview_every": 2})
    train(load_config([T2I_CONFIG], overrides))
    weights, _ = ckpt.load_weights(ckpt.latest_checkpoint(tmp_path / "run"), "model")
    assert "text.tower.embed_tokens.weight" in weights
    assert "text.proj.weight" in weights and "text.proj.bias" not in weights


def test_encoders_of_one_directory_share_a_frozen_tower(t5_dir):
    """Every diffusion stage of a pipeline names the same frozen T5: it is loaded once per process.
    A tower that trains is each encoder's own."""
    a, b = build_text_encoder(t5_config(t5_dir)), build_text_encoder(t5_config(t5_dir, out_dim=16))
    assert a.tower is b.tower and a.proj is not b.proj
    trained = build_text_encoder(t5_config(t5_dir, frozen=False))
    assert trained.tower is not a.tower
    torch.testing.assert_close(trained.tower.state_dict()["block.0.layer.0.SelfAttention.q.weight"],
                               a.tower.state_dict()["block.0.layer.0.SelfAttention.q.weight"])


def test_trim_context_cuts_to_the_longest_prompt_plus_one_and_guidance_keeps_one_length(t5_dir):
    """The release cuts the context to the batch's longest prompt plus one padding token, and its
    null context has that length too (with `pool_query: all` the pooled text depends on it)."""
    from kvideo.inference.denoiser import TextDenoiser

    torch.manual_seed(2)
    full = build_text_encoder(t5_config(t5_dir))
    trimmed = build_text_encoder(t5_config(t5_dir, trim_context=True))
    trimmed.load_state_dict(full.state_dict())
    tokens, mask = trimmed(PROMPTS)
    longest = max(len(p.split()) + 1 for p in PROMPTS)  # the words and </s>
    assert tokens.shape[1] == mask.shape[1] == longest + 1 and not mask[:, -1].any()
    reference, _ = full(PROMPTS)
    torch.testing.assert_close(tokens, reference[:, :longest + 1])

    denoiser = TextDenoiser(nn.Identity(), trimmed)
    cond, uncond = denoiser.guidance_contexts(PROMPTS)
    assert cond.tokens.shape == uncond.tokens.shape == tokens.shape
    assert uncond.mask[:, 0].all() and not uncond.mask[:, 1:].any()
    cond, negative = denoiser.guidance_contexts(PROMPTS[:1] * 2, negative_prompt=PROMPTS[1])
    assert cond.tokens.shape == negative.tokens.shape and cond.tokens.shape[1] == longest + 1  # padded to the longer
    assert not cond.mask[:, len(PROMPTS[0].split()) + 1:].any()
    blank = denoiser.context(["", PROMPTS[0]])  # a blank prompt's null context takes the batch's length
    assert blank.tokens.shape[1] == len(PROMPTS[0].split()) + 2 and blank.mask[0].tolist()[:2] == [True, False]
